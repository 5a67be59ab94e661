-- An operator's replay of a dead letter (ARGV[7] = 'dead') or a parked event ('parked'):
-- the record goes, and its pair is queued again as attempt 1, in one step, so two operators
-- replaying at once queue it once. ARGV[8] the record's id.
-- Returns {'queued', queue}, {'missing'} (no such record: replayed or purged already), or
-- {'no_body'} (the body expired; the record is left for purge).
local kind, rid = ARGV[7], ARGV[8]
local index = K.dead
if kind == 'parked' then index = K.parked end
local rec = redis.call('HMGET', index .. ':' .. rid, 'event_id', 'handler', 'queue')
if not rec[1] then return {'missing'} end
local id = rec[1]
local pair, queue = rec[2], rec[3]
if kind == 'parked' then pair, queue = K.dispatch_pair, K.dispatch_queue end
local ev = K.ev .. id
if redis.call('EXISTS', K.body .. id) == 0 or redis.call('EXISTS', ev) == 0 then
  return {'no_body'}
end
redis.call('DEL', index .. ':' .. rid)
redis.call('ZREM', index, rid)
redis.call('HINCRBY', ev, 'keep', -1)
redis.call('PERSIST', ev)
redis.call('PERSIST', K.body .. id)
local s = redis.call('HGET', ev, f(pair, 's'))
if not s or FINAL[s] then
  -- An open pair is already on its way; a final one opens again.
  redis.call('HINCRBY', ev, 'open', 1)
  redis.call('HSET', ev, f(pair, 'a'), 1, f(pair, 'n'), 0, f(pair, 'q'), queue)
  set_state(ev, pair, queue, s, 'queued')
  -- Held instead, if its handler is paused or its breaker open.
  local groups = new_groups()
  add_to_group(groups, pair, queue, id)
  flush(groups, 1)
end
trail(id, cjson.encode({at = NOW / 1000, what = 'replayed', handler = pair}))
return {'queued', queue}
