-- Start the attempts of a run: the events its message names, and in batch mode the events of the
-- messages for the same pair waiting right behind it on its queue (up to a cap).
-- ARGV[7] pair (handler name, or the dispatch's), ARGV[8] owner (a token of this run),
-- ARGV[9] most starts of one attempt (poison), ARGV[10] the message's number on its queue,
-- ARGV[11] its queue, ARGV[12] ms to wait for a busy order lock, ARGV[13] 'batch' or 'one',
-- ARGV[14] most events this run takes in all (batch mode: messages of the same pair waiting at
-- the head of the queue are taken, whole, while they fit), ARGV[15..] event ids.
-- Returns {ids taken from further messages, {per event (named ones, then taken ones): {what, ...}}}:
-- {'run', attempt, body, endpoint, received_at, type} to run it now; in batch mode
-- {'suspect', version} (started before without finishing: it may be what killed that run, so
-- it is started on its own, just before it runs) and {'later', version} (an older event of the
-- same entity is in this run: it starts once that one has finished); otherwise why not: 'gone'
-- (no such event or pair), a final state, 'early' (its retry is not due: a stale copy), 'busy'
-- (running under a live lease), 'poison' (started too often without finishing: dead-lettered),
-- 'deferred' (its entity's lock is held: the same attempt waits), 'stale' (an equal or newer
-- version of its entity was applied), 'held' (its handler is paused or its breaker open).
local pair, owner, max_starts = ARGV[7], ARGV[8], tonumber(ARGV[9])
local seq, queue, defer_ms = tonumber(ARGV[10]), ARGV[11], tonumber(ARGV[12])
local batch, most = ARGV[13] == 'batch', tonumber(ARGV[14])
if batch then most = math.min(most, math.max(#ARGV - 14, batch_size(pair, most))) end

-- A number from before a Redis rollback (AOF lost its last writes) is above what calhook:seq
-- says was pushed: it would make every message still waiting look taken, so it is ignored.
local function mark_taken(n)
  if n and queue ~= '' and n > tonumber(redis.call('HGET', K.taken, queue) or '0')
      and n <= tonumber(redis.call('HGET', K.seq, queue) or '0') then
    redis.call('HSET', K.taken, queue, n)
  end
end
mark_taken(seq)

local ids = {}
for i = 15, #ARGV do ids[#ids + 1] = ARGV[i] end
local holding = hold_of(pair)

-- The messages waiting next on the queue for the same pair join this run while they fit: under
-- a backlog one task runs many events, under light load the queue is empty and nothing waits.
-- Their pairs start here, in this script, so a message taken is never lost: a pair that does not
-- start now is found by the sweep (its message's number is below calhook:taken).
local taken_ids = {}
local task = (pair == K.dispatch_pair) and K.dispatch_task or K.handler_task
while batch and #ids < most do
  local raw = redis.call('LINDEX', queue, -1)
  if not raw then break end
  local ok, msg = pcall(cjson.decode, raw)
  if not ok or type(msg) ~= 'table' or type(msg.headers) ~= 'table'
      or msg.headers.task ~= task or type(msg.properties) ~= 'table'
      or msg.properties.body_encoding ~= 'utf-8' then
    break
  end
  local okb, body = pcall(cjson.decode, msg.body)
  if not okb or type(body) ~= 'table' or type(body[2]) ~= 'table' then break end
  local kw = body[2]
  if type(kw.ids) ~= 'table' or #kw.ids == 0 or #ids + #kw.ids > most
      or (pair ~= K.dispatch_pair and kw.handler ~= pair) then
    break
  end
  redis.call('RPOP', queue)
  mark_taken(tonumber(kw.seq))
  for _, id in ipairs(kw.ids) do
    ids[#ids + 1] = id
    taken_ids[#taken_ids + 1] = id
  end
end

-- In batch mode, each entity starts with its oldest version in the run; the others wait.
local first_of = {}
if batch then
  for _, id in ipairs(ids) do
    local got = redis.call('HMGET', K.ev .. id, f(pair, 'e'), f(pair, 'v'))
    if got[1] and got[2] then
      local best = first_of[got[1]]
      if not best then
        first_of[got[1]] = {id, got[2]}
      else
        local c1, k1, e1 = parse_version(got[2])
        local c0, k0, e0 = parse_version(best[2])
        if newer(c0, k0, e0, c1, k1, e1) then first_of[got[1]] = {id, got[2]} end
      end
    end
  end
end

-- What starting one event comes to (see the top).
local function start_one(id)
  local ev = K.ev .. id
  local s = redis.call('HGET', ev, f(pair, 's'))
  if not s then return {'gone'} end
  if FINAL[s] then return {s} end
  if s == 'waiting' then return {'early'} end
  if s == 'running' and tonumber(redis.call('HGET', ev, f(pair, 'l')) or '0') > NOW then
    return {'busy'}
  end
  if s == 'held' then return {'held'} end
  local got = redis.call('HMGET', ev, f(pair, 'q'), f(pair, 'a'), f(pair, 'n'), f(pair, 'e'),
    f(pair, 'v'))
  local q, attempt, n = got[1], got[2], tonumber(got[3] or '0') + 1
  local entity, version = got[4], got[5] or ''
  if holding and not is_probe(holding, id, pair) then
    -- Its handler is paused, or its breaker open: held, no attempt spent. A run cut before
    -- (its lease ran out) keeps its entity until it runs again.
    if s == 'running' then keep_lock_for_cut_run(ev, id, pair) end
    to_held(ev, id, pair, q, s)
    return {'held'}
  end
  if batch and n > 1 then
    -- It starts alone, at the end of this run: the others of its entity wait behind it.
    if entity and first_of[entity] and first_of[entity][1] == id then
      first_of[entity][3] = true
    end
    return {'suspect', version}
  end
  if batch and entity and first_of[entity] and first_of[entity][1] ~= id then
    -- Its entity's first event in this run was deferred (another run holds the entity) or is
    -- a suspect (it starts alone, last): this one waits behind it rather than overtake it.
    if first_of[entity][3] then
      to_waiting(ev, id, pair, q, s, NOW + defer_ms + 1, owner)
      return {'deferred'}
    end
    return {'later', version}
  end
  if n > max_starts then
    dead_letter(id, pair, q, s, 'poison',
      'started ' .. (n - 1) .. ' times without finishing; it may kill its worker', '', owner)
    note(id, pair, attempt, 'dead_poison', {error = 'poison'})
    return {'poison'}
  end
  local o = order_check(ev, id, pair, owner)
  if o == 'busy' then
    to_waiting(ev, id, pair, q, s, NOW + defer_ms, owner)
    if entity and first_of[entity] then first_of[entity][3] = true end
    return {'deferred'}
  end
  if o == 'stale' then
    close_pair(ev, id, pair, q, s, 'stale', owner)
    note(id, pair, attempt, 'skipped_stale')
    return {'stale'}
  end
  set_state(ev, pair, q, s, 'running')
  redis.call('HSET', ev, f(pair, 'o'), owner, f(pair, 'l'), NOW + LEASE, f(pair, 'n'), n)
  redis.call('ZADD', K.due, NOW + LEASE, member(id, pair))
  local meta = redis.call('HMGET', ev, 'ep', 'at', 'type')
  return {'run', attempt, redis.call('GET', K.body .. id) or '', meta[1] or '', meta[2] or '0',
    meta[3] or ''}
end

-- Each entity's first event goes before the others of the run, so that a deferral of it holds
-- them back too.
local out, seen, others = {}, {}, {}
for i, id in ipairs(ids) do
  if seen[id] then
    out[i] = {'busy'}  -- named twice: the first one runs it
  else
    seen[id] = true
    local entity = batch and redis.call('HGET', K.ev .. id, f(pair, 'e'))
    if entity and first_of[entity] and first_of[entity][1] ~= id then
      others[#others + 1] = i
    else
      out[i] = start_one(id)
    end
  end
end
for _, i in ipairs(others) do out[i] = start_one(ids[i]) end
-- An event taken from a further message that waits for a later step of this run stays queued
-- while its message is gone: the message this run holds (kombu's unacked) carries it now, so
-- the sweep sees it pending while the run can still start it, not lost (queued again).
if seq and queue ~= '' then
  for i = #ids - #taken_ids + 1, #ids do
    if out[i][1] == 'suspect' or out[i][1] == 'later' then
      redis.call('HSET', K.ev .. ids[i], f(pair, 'g'), queue .. '.' .. seq)
    end
  end
end
return {taken_ids, out}
