-- The heartbeat of a process's running attempts: extend each lease (and its order lock).
-- ARGV[7] owner, ARGV[8..] members "<event id>/<pair>". Returns the members this owner no
-- longer holds (finished elsewhere, forgotten, or taken over after the lease ran out).
local owner = ARGV[7]
local lost = {}
for i = 8, #ARGV do
  local id, pair = split_member(ARGV[i])
  local ev = K.ev .. id
  local got = redis.call('HMGET', ev, f(pair, 's'), f(pair, 'o'), f(pair, 'e'))
  if got[1] == 'running' and got[2] == owner then
    redis.call('HSET', ev, f(pair, 'l'), NOW + LEASE)
    if got[3] and redis.call('GET', lock_key(got[3])) == lock_value(id, pair, owner) then
      redis.call('PEXPIRE', lock_key(got[3]), LEASE)
    end
  elseif not FINAL[got[1]] then
    -- A final pair is not reported: its own run may have just finished it (the heartbeat's
    -- snapshot predates the release); a run that lost to another copy is told by finish.
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
