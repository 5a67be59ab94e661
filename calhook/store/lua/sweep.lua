-- The one recovery path: look at every pair whose time has come, and queue one message for
-- each that needs one.
-- - waiting, and due: its retry (or its wait for a lock or a rate limit) is over.
-- - running, with a lease that ran out: its run died (the start is already counted, so a pair
--   that keeps killing its worker ends as poison). A lease renewed since is looked at again.
-- - queued, and not started for RECOVER ms: its message is pending if a worker took it less than
--   HOLD ms ago (kombu's unacked), or if it was not taken and the queue has not yet been taken
--   past it (FIFO); otherwise it was lost between BRPOP and kombu's bookkeeping, or is held by
--   a dead worker, and one new message is queued.
-- Nothing is queued while an equivalent message is pending, so copies never pile up.
-- ARGV[7] most members to look at, ARGV[8] most events per message, ARGV[9] HOLD: ms a live
-- worker may hold a message it took before it starts it (the task time limit and RECOVER).
-- Returns {due, expired, lost, pending, dropped, members requeued as lost or expired...}.
local limit, batch_max, hold_ms = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local due, expired, lost, pending, dropped = 0, 0, 0, 0, 0
local groups, recovered = new_groups(), {}
local members = redis.call('ZRANGEBYSCORE', K.due, '-inf', NOW, 'LIMIT', 0, limit)
for _, m in ipairs(members) do
  local id, pair = split_member(m)
  local ev = K.ev .. id
  local got = redis.call('HMGET', ev, f(pair, 's'), f(pair, 'q'), f(pair, 'l'), f(pair, 'g'),
    f(pair, 'p'))
  local s, q = got[1], got[2]
  local requeue = false
  if not s or FINAL[s] then
    redis.call('ZREM', K.due, m)
    dropped = dropped + 1
  elseif s == 'waiting' then
    due = due + 1
    requeue = true
  elseif s == 'running' then
    if tonumber(got[3] or '0') > NOW then
      redis.call('ZADD', K.due, tonumber(got[3]), m)
    else
      expired = expired + 1
      requeue = true
      recovered[#recovered + 1] = m
      keep_lock_for_cut_run(ev, id, pair)
    end
  else
    local taken = tonumber(redis.call('HGET', K.taken, q) or '0')
    -- Taken by a worker (kombu's unacked index says when, in s): a live worker starts what it
    -- took within HOLD ms (its children free up within the task time limit; prefetch 1), so
    -- one that has not is dead, and kombu would hand the message back only after the
    -- visibility timeout. If it was alive after all, the copy is a no-op.
    local held = redis.call('ZSCORE', K.unacked_index, got[4] or '')
    if (held and tonumber(held) * 1000 > NOW - hold_ms)
        or (not held and taken <= tonumber(got[5] or '0') and redis.call('LLEN', q) > 0) then
      redis.call('ZADD', K.due, NOW + RECOVER, m)
      pending = pending + 1
    else
      lost = lost + 1
      requeue = true
      recovered[#recovered + 1] = m
    end
  end
  if requeue then
    set_state(ev, pair, q, s, 'queued')
    redis.call('HDEL', ev, f(pair, 'o'), f(pair, 'l'), f(pair, 't'))
    add_to_group(groups, pair, q, id)
  end
end
flush(groups, batch_max)
local result = {due, expired, lost, pending, dropped}
for _, m in ipairs(recovered) do result[#result + 1] = m end
return result
