-- An operator's action on a handler or a failure group, in one step so two operators at once
-- agree. ARGV[7] action, ARGV[8] handler or group id, ARGV[9] who (for the notice), ARGV[10]
-- reason (pause) or events/s (resume; '' for the default pace).
-- pause: hold the handler ({'paused', previous hold or ''}); resume: release it, closing its
-- breaker if that held it ({'resumed', previous hold, held events} or {'not_paused'});
-- acknowledge / resolve a group ({'ok'}, {'missing'} or {'ended'}).
local action, name, by, extra = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
if action == 'pause' then
  local prev = redis.call('HGET', K.hold, name)
  redis.call('HSET', K.hold, name, 'operator')
  redis.call('HSET', K.pause .. name, 'by', by, 'reason', extra,
    'at', string.format('%.3f', NOW / 1000))
  if prev ~= 'operator' then
    notice('handler_paused', name, name .. ' paused by ' .. by .. (extra ~= '' and (': ' .. extra) or ''),
      {handler = name, by = by, reason = extra})
  end
  return {'paused', prev or ''}
elseif action == 'resume' then
  local prev = redis.call('HGET', K.hold, name)
  if not prev then return {'not_paused'} end
  redis.call('HDEL', K.hold, name)
  redis.call('DEL', K.pause .. name)
  if tonumber(extra) then
    redis.call('HSET', K.release_rate, name, extra)
  else
    redis.call('HDEL', K.release_rate, name)
  end
  -- Its breaker starts afresh (an operator's pause may have taken over from it).
  local circuit = redis.call('HGET', K.recovering, name) or ''
  if string.sub(prev, 1, 8) == 'breaker:' then circuit = string.sub(prev, 9) end
  if circuit ~= '' then close_breaker(circuit, 'resumed by ' .. by) end
  local held = redis.call('ZCARD', K.held .. name)
  notice('handler_resumed', name, name .. ' resumed by ' .. by .. '; releasing ' .. held
    .. ' held events', {handler = name, by = by, held = held, was = prev})
  return {'resumed', prev, held}
else
  local key = K.fgroup .. name
  local state = redis.call('HGET', key, 'state')
  if not state then return {'missing'} end
  if state == 'closed' or state == 'resolved' then return {'ended', state} end
  if action == 'acknowledge' then
    redis.call('HSET', key, 'state', 'acknowledged', 'acked_by', by,
      'acked_at', string.format('%.3f', NOW / 1000))
  else
    end_group(name, 'resolved', by)
  end
  return {'ok'}
end
