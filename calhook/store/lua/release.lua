-- The scheduler's release of held pairs, once per tick:
-- - an open breaker whose probe time has come lets its oldest held pair through, alone (it is
--   queued while the handlers stay held; start.lua runs it as the breaker's probe); a probe that
--   went missing (held again, or final without a success) is replaced;
-- - a handler no longer held has its held pairs queued, oldest first, at its pace: the rate
--   chosen at resume, else ARGV[7] events/s; at most ARGV[8] per handler per call. Its new
--   events go straight through: the release adds at most its pace to the handler's own flow.
-- ARGV[9] most events per message, ARGV[10] ms between two calls (the scheduler's interval).
-- Returns {{'probe', circuit, member} | {'released', handler, n, left}, ...}.
local default_rate, most, batch_max = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local tick = tonumber(ARGV[10]) or 1000
local out = {}

local function queue_pair(id, pair)
  local ev = K.ev .. id
  redis.call('ZREM', K.held .. pair, id)
  local got = redis.call('HMGET', ev, f(pair, 's'), f(pair, 'q'))
  if got[1] ~= 'held' then return false end
  set_state(ev, pair, got[2], 'held', 'queued')
  return got[2]
end

for _, c in ipairs(redis.call('SMEMBERS', K.breakers)) do
  local key = K.breaker .. c
  local got = redis.call('HMGET', key, 'state', 'probe_at', 'probe', 'handlers')
  local state = got[1]
  if state == 'half_open' then
    local pid, ppair = split_member(got[3] or '/')
    local ps = redis.call('HGET', K.ev .. pid, f(ppair, 's'))
    if not ps or ps == 'held' or FINAL[ps] then
      state = 'open'
      redis.call('HSET', key, 'state', 'open', 'probe_at', NOW)
      redis.call('HDEL', key, 'probe')
      got[2] = NOW
    end
  end
  if not state then
    redis.call('SREM', K.breakers, c)
  elseif state == 'open' and NOW >= tonumber(got[2] or '0') then
    local best, best_at
    for _, h in ipairs(split_list(got[4])) do
      if redis.call('HGET', K.hold, h) == 'breaker:' .. c then
        local first = redis.call('ZRANGE', K.held .. h, 0, 0, 'WITHSCORES')
        if first[1] and (not best_at or tonumber(first[2]) < best_at) then
          best, best_at = {first[1], h}, tonumber(first[2])
        end
      end
    end
    if best then
      -- A pair whose entity is kept for a cut run (its worker died) would only wait for that
      -- run, itself held: the cut run is the probe instead (it goes first in the entity's order).
      local base = redis.call('HGET', K.ev .. best[1], f(best[2], 'e'))
      local holder = base and redis.call('GET', lock_key(base))
      if holder and string.sub(holder, -(#CUT + 1)) == '|' .. CUT then
        local cid, cpair = split_member(string.sub(holder, 1, -(#CUT + 2)))
        if redis.call('HGET', K.ev .. cid, f(cpair, 's')) == 'held'
            and redis.call('HGET', K.hold, cpair) == 'breaker:' .. c then
          best = {cid, cpair}
        end
      end
      local queue = queue_pair(best[1], best[2])
      if queue then
        redis.call('HSET', key, 'state', 'half_open', 'probe', member(best[1], best[2]))
        redis.call('HINCRBY', key, 'probes', 1)
        enqueue(queue, best[2], {best[1]})
        out[#out + 1] = {'probe', c, member(best[1], best[2])}
      end
    end
  end
end

for _, h in ipairs(redis.call('SMEMBERS', K.holding)) do
  if not redis.call('HGET', K.hold, h) then
    local rate = tonumber(redis.call('HGET', K.release_rate, h) or '') or default_rate
    -- At most a tick's worth at once (a second's at least; one event, at a pace below one a
    -- second), so a pause in the releasing is not made up in one burst.
    local span = math.max(1000, 1000 / rate, tick)
    local last = tonumber(redis.call('HGET', K.released, h) or '') or (NOW - span)
    if NOW - last > span then last = NOW - span end
    local quota = math.min(math.floor((NOW - last) * rate / 1000), most)
    local n = 0
    if quota >= 1 then
      local groups = new_groups()
      for _, id in ipairs(redis.call('ZRANGE', K.held .. h, 0, quota - 1)) do
        local queue = queue_pair(id, h)
        if queue then
          add_to_group(groups, h, queue, id)
          n = n + 1
        end
      end
      flush(groups, batch_max)
      redis.call('HSET', K.released, h, last + quota * 1000 / rate)
    end
    local left = redis.call('ZCARD', K.held .. h)
    if n > 0 then out[#out + 1] = {'released', h, n, left} end
    if left == 0 then
      redis.call('SREM', K.holding, h)
      redis.call('HDEL', K.released, h)
      redis.call('HDEL', K.release_rate, h)
    end
  end
end
return out
