-- Record how the attempts of one run ended, with their trail entries and counters.
-- ARGV[7] pair, ARGV[8] owner, ARGV[9] the throughput key of this 10 s, ARGV[10..] one JSON
-- object per event: {id, pair and tp (this entry's pair and throughput key, when one call records
-- the endings of several runs of the process), do = done|retry|defer|dead, outcome (the trail's and the counters'
-- word), delay (ms from now, for retry and defer), fields (more of the trail entry), bucket and dur
-- (its duration histogram), cost (s one more event adds to a batch: its duration for a sync
-- handler, 0 for an async one), reason, error, traceback (for a dead letter), gist (the error
-- scrubbed of personal data, for its failure group), brk (a transient failure: its circuit's
-- breaker, see breaker_failure in _lib.lua)}.
-- 'done' counts from whoever ran it (the effect happened); the other endings only from the
-- owner of a live run, so a copy that lost its lease cannot undo or re-arm anything.
-- Returns per event 'ok', 'late' (already final) or 'lost' (not this run's any more).
local owner = ARGV[8]
local out = {}
for i = 10, #ARGV do
  local e = cjson.decode(ARGV[i])
  local pair, tput = e.pair or ARGV[7], e.tp or ARGV[9]
  local id = e.id
  local ev = K.ev .. id
  local got = redis.call('HMGET', ev, f(pair, 's'), f(pair, 'o'), f(pair, 'q'), f(pair, 'a'))
  local s, o, q, attempt = got[1], got[2], got[3], got[4]
  local r = 'ok'
  if not s or FINAL[s] then
    r = 'late'
    if s then
      -- A run that took over from a stalled one whose late done closed the pair: it held the
      -- entity until now.
      release_lock(ev, id, pair, owner)
      if s == 'done' or s == 'stale' then forget_entity(ev, id, pair) end
    end
  elseif e['do'] ~= 'done' and (s ~= 'running' or o ~= owner) then
    r = 'lost'
  else
    local outcome = e.outcome
    if e.brk then breaker_failure(e.brk, id, pair, e.error) end
    if e['do'] == 'done' then
      order_commit(ev, pair)
      close_pair(ev, id, pair, q, s, 'done', owner)
      redis.call('INCR', tput)
      redis.call('EXPIRE', tput, 120)
      local circuit = redis.call('HGET', K.recovering, pair)
      if circuit then recovered(id, pair, circuit) end
    elseif (e['do'] == 'retry' or e.reason == 'exhausted') and hold_of(pair)
        and not is_probe(hold_of(pair), id, pair) then
      -- A transient failure while its handler is held (its breaker just opened, or this was the
      -- breaker's probe): the destination's fault, not the event's. It waits with the others,
      -- its attempt not spent, rather than walk the retry schedule or be dead-lettered.
      release_lock(ev, id, pair, owner)
      to_held(ev, id, pair, q, s)
      redis.call('HSET', ev, f(pair, 'n'), 0)
      note_failure(id, pair, attempt, 'retry_scheduled', e.error or '', e.gist)
      outcome = 'held'
    elseif e['do'] == 'retry' then
      to_waiting(ev, id, pair, q, s, NOW + e.delay, owner)
      redis.call('HSET', ev, f(pair, 'a'), tonumber(attempt) + 1, f(pair, 'n'), 0)
      note_failure(id, pair, attempt, e.outcome, e.error or '', e.gist)
    elseif e['do'] == 'defer' then
      to_waiting(ev, id, pair, q, s, NOW + e.delay, owner)
      redis.call('HINCRBY', ev, f(pair, 'n'), -1)
    else
      dead_letter(id, pair, q, s, e.reason, e.error or '', e.traceback or '', owner, e.gist)
    end
    note(id, pair, attempt, outcome, e.fields)
    if e.bucket then
      redis.call('HINCRBY', K.duration .. pair, e.bucket, 1)
      redis.call('HINCRBYFLOAT', K.duration .. pair, 'sum', e.dur)
    end
    if e.cost then
      -- What one more event adds to a batch of this handler (a moving average): how many
      -- events its messages name (batch_size).
      local old = tonumber(redis.call('HGET', K.duration .. pair, 'cost') or '')
      local cost = old and (0.8 * old + 0.2 * e.cost) or e.cost
      redis.call('HSET', K.duration .. pair, 'cost', string.format('%.6f', cost))
    end
  end
  out[#out + 1] = r
end
return out
