-- An operator's purge of a dead letter (ARGV[7] = 'dead') or a parked record ('parked'), or the
-- retention's: the record goes, and the event's body with it once nothing else needs it.
-- ARGV[8] the newest a record may have been stored (s since the epoch) to be purged: the
-- retention's cutoff, so a record written again since it was read is kept; '+inf' for people.
-- ARGV[9..] record ids. Returns how many records were removed.
-- Only a record still in the index counts: a second purge of one, or a purge of one just
-- replayed, must not take a body another record still needs.
local index = K.dead
if ARGV[7] == 'parked' then index = K.parked end
local cutoff = ARGV[8]
local removed = 0
for i = 9, #ARGV do
  local rid = ARGV[i]
  local score = redis.call('ZSCORE', index, rid)
  if score and (cutoff == '+inf' or tonumber(score) <= tonumber(cutoff)) then
    local id = redis.call('HGET', index .. ':' .. rid, 'event_id') or string.match(rid, '^[^.]+')
    redis.call('DEL', index .. ':' .. rid)
    redis.call('ZREM', index, rid)
    removed = removed + 1
    local ev = K.ev .. id
    if redis.call('EXISTS', ev) == 1 and redis.call('HINCRBY', ev, 'keep', -1) <= 0 then
      redis.call('HSET', ev, 'keep', 0)
      if tonumber(redis.call('HGET', ev, 'open') or '0') <= 0 then settle(id) end
    end
  end
end
return removed
