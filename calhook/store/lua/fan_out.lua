-- What dispatch decided for the events of one run: route each to its handlers, or park it.
-- ARGV[7] the dispatch queue's throughput key of this 10 s, ARGV[8] most events per handler
-- message, ARGV[9] the handlers this run may run itself, comma-separated (their queues are
-- consumed by its worker), ARGV[10..] one JSON object per event: {id, type, received (trail entry), then either
-- route = {{handler, queue, entity or '', version or '', 'async' or ''}, ...} or park = {reason,
-- errors}}, or
-- {id, add = true, body, route} to add pairs to an event dispatched by calhook 0.1.
-- Dispatch is deterministic, so whichever run of it finishes first decides; a later one is
-- 'late' and writes nothing. Returns {per event 'ok' or 'late', {handler, queue, ids...} for each
-- handler whose new pairs this run runs itself}: those of ARGV[9] whose queue is empty, so that
-- nothing waits before them (under light load one Celery task per event instead of two). They
-- get no message: if the run dies before starting them, the sweep queues one (their message
-- number is unset, below calhook:taken).
local tput, batch_max = ARGV[7], tonumber(ARGV[8])
local here = {}
for name in string.gmatch(ARGV[9], '[^,]+') do here[name] = true end
local D = K.dispatch_pair
local out, groups = {}, new_groups()
for i = 10, #ARGV do
  local e = cjson.decode(ARGV[i])
  local id = e.id
  local ev = K.ev .. id
  local s = redis.call('HGET', ev, f(D, 's'))
  if e.add then
    -- A handler message of calhook 0.1 (workers/legacy.py): its dispatch happened there, so
    -- the pair is added to the event as it stands, with the body the message carried.
    if s then
      for _, h in ipairs(e.route) do
        local name, queue = h[1], h[2]
        if not redis.call('HGET', ev, f(name, 's')) then
          -- Only a pair that opens keeps the body: a late copy of one that ran adds nothing.
          if redis.call('EXISTS', K.body .. id) == 0 then
            redis.call('SET', K.body .. id, e.body)
          end
          redis.call('PERSIST', ev)
          redis.call('PERSIST', K.body .. id)
          redis.call('HSET', ev, f(name, 'a'), 1, f(name, 'n'), 0, f(name, 'q'), queue)
          set_state(ev, name, queue, nil, 'queued')
          redis.call('HINCRBY', ev, 'open', 1)
          add_to_group(groups, name, queue, id)
        end
      end
      out[#out + 1] = 'ok'
    else
      out[#out + 1] = 'late'
    end
  elseif not s or FINAL[s] then
    out[#out + 1] = 'late'
  else
    redis.call('HSET', ev, 'type', e.type)
    trail(id, e.received)
    redis.call('ZADD', K.trail_index, tonumber(redis.call('HGET', ev, 'at')), id)
    if e.park then
      local meta = redis.call('HMGET', ev, 'ep', 'at')
      write_record(K.parked, id, {event_id = id, type = e.type, endpoint = meta[1] or '',
        received_at = meta[2] or '0', parked_at = string.format('%.3f', NOW / 1000),
        reason = e.park.reason, errors = e.park.errors})
      close_pair(ev, id, D, K.dispatch_queue, s, 'parked', nil)
      trail(id, cjson.encode({at = NOW / 1000, what = 'parked', reason = e.park.reason}))
    else
      local names = {}
      for _, h in ipairs(e.route) do
        local name, queue = h[1], h[2]
        if h[5] == 'async' then
          -- The events of an async handler's batch run at once: its messages are full from the
          -- start (batch_size).
          redis.call('HSETNX', K.duration .. name, 'cost', '0')
        end
        if not redis.call('HGET', ev, f(name, 's')) then
          redis.call('HSET', ev, f(name, 'a'), 1, f(name, 'n'), 0, f(name, 'q'), queue)
          if h[3] ~= '' then redis.call('HSET', ev, f(name, 'e'), h[3], f(name, 'v'), h[4]) end
          set_state(ev, name, queue, nil, 'queued')
          redis.call('HINCRBY', ev, 'open', 1)
          add_to_group(groups, name, queue, id)
        end
        names[#names + 1] = name
      end
      close_pair(ev, id, D, K.dispatch_queue, s, 'done', nil)
      trail(id, cjson.encode({at = NOW / 1000, what = 'dispatched', handlers = names}))
    end
    redis.call('INCR', tput)
    redis.call('EXPIRE', tput, 120)
    out[#out + 1] = 'ok'
  end
end
local inline = {}
local kept = new_groups()
for _, g in ipairs(groups.keys) do
  local sep = string.find(g, '\n', 1, true)
  local pair, queue = string.sub(g, 1, sep - 1), string.sub(g, sep + 1)
  local ids = groups.ids[g]
  if here[pair] and not hold_of(pair) and redis.call('LLEN', queue) == 0 then
    -- One batch of it (a slow sync handler's is one event); the rest is queued as usual.
    local entry, rest = {pair, queue}, {}
    local size = batch_size(pair, batch_max)
    for j, id in ipairs(ids) do
      if j <= size then
        redis.call('ZADD', K.due, NOW + RECOVER, member(id, pair))
        entry[#entry + 1] = id
      else
        rest[#rest + 1] = id
      end
    end
    inline[#inline + 1] = entry
    ids = rest
  end
  if #ids > 0 then
    kept.keys[#kept.keys + 1] = g
    kept.ids[g] = ids
  end
end
flush(kept, batch_max)
return {out, inline}
