-- The heartbeat of a process's running attempts: extend each lease (and its order lock).
-- ARGV[7] owner, ARGV[8..] members "<event id>/<pair>". Returns the members this owner no
-- longer holds (forgotten, or taken over after the lease ran out).
-- A lease renewed after it lapsed (a pause longer than it) takes its entity's lock back if it
-- is free, and is lost if another run holds it. A run whose pair another copy finished keeps
-- its entity's lock until it ends, so no newer event is applied under it.
local owner = ARGV[7]
local lost = {}
for i = 8, #ARGV do
  local id, pair = split_member(ARGV[i])
  local ev = K.ev .. id
  local got = redis.call('HMGET', ev, f(pair, 's'), f(pair, 'o'), f(pair, 'e'))
  local lock, holder = nil, nil
  if got[3] then
    lock = lock_key(got[3])
    holder = redis.call('GET', lock)
  end
  local mine = lock_value(id, pair, owner)
  if got[1] == 'running' and got[2] == owner then
    if lock and holder and holder ~= mine then
      lost[#lost + 1] = ARGV[i]
    else
      redis.call('HSET', ev, f(pair, 'l'), NOW + LEASE)
      if lock then redis.call('SET', lock, mine, 'PX', LOCK_MS) end
    end
  else
    if lock and holder == mine then redis.call('PEXPIRE', lock, LOCK_MS) end
    -- A final pair is not reported: its own run may have just finished it (the heartbeat's
    -- snapshot predates the release); a run that lost to another copy is told by finish.
    if not FINAL[got[1]] then lost[#lost + 1] = ARGV[i] end
  end
end
return lost
