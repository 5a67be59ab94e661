-- An operator's purge of a dead letter (ARGV[7] = 'dead') or a parked record ('parked'), or the
-- retention's: the record goes, and the event's body with it once nothing else needs it.
-- ARGV[8..] record ids. Returns how many records were removed.
local index = K.dead
if ARGV[7] == 'parked' then index = K.parked end
local removed = 0
for i = 8, #ARGV do
  local rid = ARGV[i]
  local id = redis.call('HGET', index .. ':' .. rid, 'event_id') or string.match(rid, '^[^.]+')
  removed = removed + redis.call('DEL', index .. ':' .. rid)
  redis.call('ZREM', index, rid)
  local ev = K.ev .. id
  if redis.call('EXISTS', ev) == 1 and redis.call('HINCRBY', ev, 'keep', -1) <= 0 then
    redis.call('HSET', ev, 'keep', 0)
    if tonumber(redis.call('HGET', ev, 'open') or '0') <= 0 then settle(id) end
  end
end
return removed
