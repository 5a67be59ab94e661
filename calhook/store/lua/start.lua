-- Start the attempts a message names: one call for every event of the message.
-- ARGV[7] pair (handler name, or the dispatch's), ARGV[8] owner (a token of this run),
-- ARGV[9] most starts of one attempt (poison), ARGV[10] the message's number on its queue,
-- ARGV[11] its queue, ARGV[12] ms to wait for a busy order lock, ARGV[13..] event ids.
-- Returns per event {what, ...}: {'run', attempt, body, endpoint, received_at, type} to run it;
-- otherwise why not: 'gone' (no such event or pair), a final state, 'early' (its retry is not
-- due: this message is a stale copy), 'busy' (running under a live lease), 'poison' (started
-- too often without finishing: dead-lettered), 'deferred' (its entity's lock is held: the
-- same attempt waits), 'stale' (an equal or newer version of its entity was applied).
local pair, owner, max_starts = ARGV[7], ARGV[8], tonumber(ARGV[9])
local seq, queue, defer_ms = tonumber(ARGV[10]), ARGV[11], tonumber(ARGV[12])
-- A number from before a Redis rollback (AOF lost its last writes) is above what calhook:seq
-- says was pushed: it would make every message still waiting look taken, so it is ignored.
if seq and queue ~= '' and seq > tonumber(redis.call('HGET', K.taken, queue) or '0')
    and seq <= tonumber(redis.call('HGET', K.seq, queue) or '0') then
  redis.call('HSET', K.taken, queue, seq)
end
local out = {}
for i = 13, #ARGV do
  local id = ARGV[i]
  local ev = K.ev .. id
  local s = redis.call('HGET', ev, f(pair, 's'))
  local r
  if not s then
    r = {'gone'}
  elseif FINAL[s] then
    r = {s}
  elseif s == 'waiting' then
    r = {'early'}
  elseif s == 'running' and tonumber(redis.call('HGET', ev, f(pair, 'l')) or '0') > NOW then
    r = {'busy'}
  else
    local q = redis.call('HGET', ev, f(pair, 'q'))
    local attempt = redis.call('HGET', ev, f(pair, 'a'))
    local n = tonumber(redis.call('HGET', ev, f(pair, 'n')) or '0') + 1
    if n > max_starts then
      dead_letter(id, pair, q, s, 'poison',
        'started ' .. (n - 1) .. ' times without finishing; it may kill its worker', '', owner)
      note(id, pair, attempt, 'dead_poison', {error = 'poison'})
      r = {'poison'}
    else
      local o = order_check(ev, id, pair, owner)
      if o == 'busy' then
        to_waiting(ev, id, pair, q, s, NOW + defer_ms, owner)
        r = {'deferred'}
      elseif o == 'stale' then
        close_pair(ev, id, pair, q, s, 'stale', owner)
        note(id, pair, attempt, 'skipped_stale')
        r = {'stale'}
      else
        set_state(ev, pair, q, s, 'running')
        redis.call('HSET', ev, f(pair, 'o'), owner, f(pair, 'l'), NOW + LEASE, f(pair, 'n'), n)
        redis.call('ZADD', K.due, NOW + LEASE, member(id, pair))
        local meta = redis.call('HMGET', ev, 'ep', 'at', 'type')
        r = {'run', attempt, redis.call('GET', K.body .. id) or '', meta[1] or '', meta[2] or '0',
             meta[3] or ''}
      end
    end
  end
  out[#out + 1] = r
end
return out
