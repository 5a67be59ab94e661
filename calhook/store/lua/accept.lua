-- The ingress's write of a batch of accepted events: dedup, each body once, each event's state,
-- and one dispatch message naming every new event of the batch.
-- KEYS[i]: the i-th event's dedup key.
-- ARGV[7]: dedup ttl (s); ARGV[8]: flags, the sum of 1 to queue no dispatch message (the caller
-- starts the dispatch itself; the sweep queues one if it never does) and 2 to count the batch in
-- K.confirmed (a write even when every event is a duplicate, so that the WAITAOF the ingress
-- sends next covers a retry's earlier write: ingest/acks.py); then per event ARGV[7 + 2i]: its
-- id, ARGV[8 + 2i]: its record, "<endpoint>\n<received_at>\n<type>\n<body>".
-- Returns per event the first id of a body already seen, or false once it is stored.
-- A refused write (out of memory) is refused at the first write: nothing is stored.
local dedup_ttl, flags = ARGV[7], tonumber(ARGV[8])
local quiet = flags % 2 == 1
if flags >= 2 then redis.call('INCR', K.confirmed) end
local results, new = {}, {}
for i = 1, #KEYS do
  local id, record = ARGV[7 + 2 * i], ARGV[8 + 2 * i]
  local first = redis.call('GET', KEYS[i])
  if first and first ~= id then
    results[i] = first
  else
    -- Our own id: a retry of a batch that had been written (a timeout is not a refusal). An
    -- event already stored (its dedup key expired, a spool replayed late) is not stored again:
    -- that would reopen its dispatch under pairs still open.
    if not first and redis.call('EXISTS', K.ev .. id) == 1 then
      redis.call('SET', KEYS[i], id, 'EX', dedup_ttl)
    elseif not first then
      local a = string.find(record, '\n', 1, true)
      local b = string.find(record, '\n', a + 1, true)
      local c = string.find(record, '\n', b + 1, true)
      local ev = K.ev .. id
      redis.call('SET', KEYS[i], id, 'EX', dedup_ttl)
      redis.call('SET', K.body .. id, string.sub(record, c + 1))
      redis.call('HSET', ev, 'ep', string.sub(record, 1, a - 1),
        'at', string.sub(record, a + 1, b - 1), 'type', string.sub(record, b + 1, c - 1),
        'bytes', #record - c, 'open', 1,
        f(K.dispatch_pair, 'a'), 1, f(K.dispatch_pair, 'n'), 0,
        f(K.dispatch_pair, 'q'), K.dispatch_queue)
      set_state(ev, K.dispatch_pair, K.dispatch_queue, nil, 'queued')
      new[#new + 1] = id
    end
    results[i] = false
  end
end
if #new > 0 and not quiet then enqueue(K.dispatch_queue, K.dispatch_pair, new) end
if quiet then
  for _, id in ipairs(new) do redis.call('ZADD', K.due, NOW + RECOVER, member(id, K.dispatch_pair)) end
end
return results
