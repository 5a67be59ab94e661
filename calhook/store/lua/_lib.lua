-- Shared by every script: loaded in front of each one (calhook/store/scripts.py), after a table
-- K of key names rendered from calhook/store/keys.py.
--
-- Every script's ARGV starts with the same six values; its own arguments follow from ARGV[7]:
-- ms: Redis's clock, so workers and schedulers with skewed clocks agree on leases and due
-- times; a caller may pass its own (tests move time forward this way), else ''.
local NOW = tonumber(ARGV[1])
if not NOW then
  local time = redis.call('TIME')
  NOW = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local RECOVER = tonumber(ARGV[2])    -- ms a queued pair waits before the sweep checks its message
local LEASE = tonumber(ARGV[3])      -- ms a started pair is owned without a heartbeat
local DONE_TTL = tonumber(ARGV[4])   -- s an event's states stay once every pair is final
local KEEP_TTL = tonumber(ARGV[5])   -- s a dead letter or parked record (and its body) stays
local TRAIL_TTL = tonumber(ARGV[6])  -- s an event's trail stays

local FINAL = {done = true, stale = true, dead = true, parked = true}
local COUNTED = {queued = true, running = true, waiting = true, held = true}
local ORDER_TTL = 90 * 86400
local DELETE_KIND = 2
local CREATE_KIND = 0

local function f(pair, field) return pair .. '/' .. field end
local function member(id, pair) return id .. '/' .. pair end

local function split_member(m)
  local i = string.find(m, '/', 1, true)
  return string.sub(m, 1, i - 1), string.sub(m, i + 1)
end

-- Every state change goes through here, so the per-queue counts stay right.
local function set_state(ev, pair, queue, old, new)
  if old and COUNTED[old] then redis.call('HINCRBY', K.pairs .. old, queue, -1) end
  if COUNTED[new] then redis.call('HINCRBY', K.pairs .. new, queue, 1) end
  redis.call('HSET', ev, f(pair, 's'), new)
end

local function trail(id, entry)
  redis.call('RPUSH', K.trail .. id, entry)
  redis.call('EXPIRE', K.trail .. id, TRAIL_TTL)
end

-- One attempt's outcome in the event's trail and the fleet's counters (workers/stats).
local function note(id, pair, attempt, outcome, fields)
  fields = fields or {}
  fields.at = NOW / 1000
  fields.what = 'handler'
  fields.handler = pair
  fields.attempt = tonumber(attempt)
  fields.outcome = outcome
  trail(id, cjson.encode(fields))
  redis.call('HINCRBY', K.outcomes, pair .. '\t' .. outcome, 1)
end

-- An operational transition (a breaker opened, a failure group opened, a handler paused …) for
-- the notices (workers/notices.py), which send each once.
local NOTICES_MAX = 10000
local function notice(kind, subject, text, data)
  redis.call('XADD', K.notices, 'MAXLEN', '~', NOTICES_MAX, '*', 'kind', kind,
    'subject', subject, 'text', text, 'at', string.format('%.3f', NOW / 1000),
    'data', cjson.encode(data or {}))
end

-- Failure groups: failures grouped by (handler, error class, reason), each an "issue" with a
-- count, first and last seen, a few sample events and the latest error text, scrubbed of
-- personal data by the worker (its 'gist'). A group of transient failures (retrying, or
-- exhausted) closes by itself at the handler's next success; others stay until resolved.
local GROUP_SAMPLES = 5
local GROUP_KEEP_S = 30 * 86400
local AUTO_CLOSE = {transient = true, exhausted = true}
local GROUP_TOLD_AT = 5

local function group_failure(id, pair, reason, error, gist)
  local class = string.match(error or '', '^[^:]*') or ''
  local gid = string.sub(redis.sha1hex(pair .. '\t' .. class .. '\t' .. reason), 1, 12)
  local key = K.fgroup .. gid
  local got = redis.call('HMGET', key, 'state', 'samples', 'count', 'told')
  if not got[1] or got[1] == 'resolved' or got[1] == 'closed' then
    redis.call('DEL', key)
    redis.call('HSET', key, 'id', gid, 'handler', pair, 'error', class, 'reason', reason,
      'state', 'open', 'count', 0, 'first', string.format('%.3f', NOW / 1000))
    got = {nil, nil, '0', nil}
  end
  -- A retried failure is told once it is not a blip: at its GROUP_TOLD_AT-th (a breaker
  -- opening is told on its own); a dead letter at once.
  if not got[4] and (reason ~= 'transient' or tonumber(got[3]) + 1 >= GROUP_TOLD_AT) then
    redis.call('HSET', key, 'told', 1)
    notice('group_opened', pair, pair .. ': ' .. class .. ' (' .. reason .. ')',
      {group = gid, handler = pair, error = class, reason = reason, message = gist or '',
       failures = tonumber(got[3]) + 1})
  end
  local samples = got[2] and cjson.decode(got[2]) or {}
  local seen = false
  for _, s in ipairs(samples) do if s == id then seen = true end end
  if not seen then
    samples[#samples + 1] = id
    if #samples > GROUP_SAMPLES then table.remove(samples, 1) end
  end
  redis.call('HINCRBY', key, 'count', 1)
  redis.call('HSET', key, 'last', string.format('%.3f', NOW / 1000), 'samples',
    cjson.encode(samples), 'message', gist or '')
  redis.call('PERSIST', key)
  redis.call('ZADD', K.fgroups, NOW / 1000, gid)
  if AUTO_CLOSE[reason] then
    redis.call('SADD', K.fgroup .. 'open:' .. pair, gid)
    redis.call('HSETNX', K.recovering, pair, '')
  end
end

-- A group's end: 'closed' (the handler recovered) or 'resolved' (an operator said so).
local function end_group(gid, state, by)
  local key = K.fgroup .. gid
  local got = redis.call('HMGET', key, 'state', 'handler', 'error', 'reason', 'count', 'first',
    'told')
  if not got[1] or got[1] == 'closed' or got[1] == 'resolved' then return false end
  redis.call('HSET', key, 'state', state, 'ended', string.format('%.3f', NOW / 1000), 'by', by)
  redis.call('EXPIRE', key, GROUP_KEEP_S)
  redis.call('SREM', K.fgroup .. 'open:' .. got[2], gid)
  -- The end of a group nobody was told of is not told either.
  if not got[7] then return true end
  notice('group_' .. state, got[2], got[2] .. ': ' .. got[3] .. ' (' .. got[4] .. '), '
    .. got[5] .. ' failures', {group = gid, handler = got[2], error = got[3], reason = got[4],
    count = tonumber(got[5]), first = tonumber(got[6]), by = by})
  return true
end

-- The status page's latest failures: the error's class only (its text may quote personal data,
-- and stays in the dead letter); and the failure's group.
local function note_failure(id, pair, attempt, outcome, error, gist)
  redis.call('LPUSH', K.failures, cjson.encode({
    at = NOW / 1000, event_id = id, handler = pair, attempt = tonumber(attempt),
    outcome = outcome, error = string.match(error or '', '^[^:]*')}))
  redis.call('LTRIM', K.failures, 0, 49)
  if pair ~= K.dispatch_pair then
    local reason = 'transient'
    if string.sub(outcome, 1, 5) == 'dead_' then reason = string.sub(outcome, 6) end
    group_failure(id, pair, reason, error, gist)
  end
end

local EMBED = '{"callbacks":null,"errbacks":null,"chain":null,"chord":null}'

-- One Celery (protocol 2) message naming the events `ids` for `pair`, pushed onto `queue`.
-- The body is JSON, not base64 (kombu reads a body without body_encoding as it is). Its number
-- on the queue (seq) lets the sweep tell a message still waiting from one lost in transit.
local function push(queue, pair, ids)
  local seq = redis.call('HINCRBY', K.seq, queue, 1)
  local tag = queue .. '.' .. seq
  local kwargs = {ids = ids, seq = seq}
  local task = K.dispatch_task
  if pair ~= K.dispatch_pair then
    kwargs.handler = pair
    task = K.handler_task
  end
  local body = '[[],' .. cjson.encode(kwargs) .. ',' .. EMBED .. ']'
  local message = '{"body":' .. cjson.encode(body)
    .. ',"content-encoding":"utf-8","content-type":"application/json","headers":{"lang":"py",'
    .. '"task":"' .. task .. '","id":"' .. tag .. '","shadow":null,"eta":null,"expires":null,'
    .. '"group":null,"group_index":null,"retries":0,"timelimit":[null,null],'
    .. '"root_id":"' .. tag .. '","parent_id":null,"argsrepr":"()","kwargsrepr":'
    .. cjson.encode(cjson.encode(kwargs)) .. ',"origin":"calhook","ignore_result":true,'
    .. '"replaced_task_nesting":0,"stamped_headers":null,"stamps":{}},"properties":{'
    .. '"correlation_id":"' .. tag .. '","reply_to":"","delivery_mode":2,"delivery_info":'
    .. '{"exchange":"","routing_key":"' .. queue .. '"},"priority":0,"body_encoding":"utf-8",'
    .. '"delivery_tag":"' .. tag .. '"}}'
  redis.call('LPUSH', queue, message)
  return seq, tag
end

-- Queue one message for the queued pairs `ids` and watch them: if no worker has taken them by
-- NOW + RECOVER, the sweep checks whether their message still exists.
local function enqueue(queue, pair, ids)
  local seq, tag = push(queue, pair, ids)
  for _, id in ipairs(ids) do
    redis.call('HSET', K.ev .. id, f(pair, 'p'), seq, f(pair, 'g'), tag)
    redis.call('ZADD', K.due, NOW + RECOVER, member(id, pair))
  end
  return tag
end

-- Pairs to queue, grouped by (pair, queue) in the order first seen; flush() queues one message
-- per group and at most `batch_max` events each.
local function new_groups() return {keys = {}, ids = {}} end

local function add_to_group(groups, pair, queue, id)
  local g = pair .. '\n' .. queue
  if not groups.ids[g] then
    groups.ids[g] = {}
    groups.keys[#groups.keys + 1] = g
  end
  table.insert(groups.ids[g], id)
end

-- How many events one message of `pair` names, at most `batch_max`: a sync handler runs a
-- batch one event after another, so its batch holds what it runs in about BATCH_S by its recent
-- cost per event (the handler's 'cost' in its duration hash, kept by finish.lua); a slow sync
-- handler gets one event per message, and so keeps its Celery pool's parallelism. An async
-- handler's events run at once (cost 0); a handler of unknown cost starts with one.
local BATCH_S = 0.05
local function batch_size(pair, batch_max)
  if pair == K.dispatch_pair then return batch_max end
  local cost = tonumber(redis.call('HGET', K.duration .. pair, 'cost') or '')
  if not cost then return 1 end
  if cost <= 0 then return batch_max end
  return math.max(1, math.min(batch_max, math.floor(BATCH_S / cost)))
end

-- Holding: a handler paused by an operator ('operator') or by its circuit's breaker
-- ('breaker:<circuit>') has its pairs held, not run: no attempt is spent, nothing is
-- dead-lettered, and they wait in held:<handler> by when their event was received, for the
-- release (release.lua) to queue them, oldest first, at the handler's pace once it resumes.
local function hold_of(pair)
  if pair == K.dispatch_pair then return nil end
  return redis.call('HGET', K.hold, pair)
end

-- The one pair a breaker lets through while it probes (release.lua chose it).
local function is_probe(how, id, pair)
  if not how or string.sub(how, 1, 8) ~= 'breaker:' then return false end
  return redis.call('HGET', K.breaker .. string.sub(how, 9), 'probe') == member(id, pair)
end

local function to_held(ev, id, pair, queue, old)
  set_state(ev, pair, queue, old, 'held')
  redis.call('HDEL', ev, f(pair, 'o'), f(pair, 'l'), f(pair, 't'))
  redis.call('ZREM', K.due, member(id, pair))
  redis.call('ZADD', K.held .. pair, tonumber(redis.call('HGET', ev, 'at') or '') or NOW / 1000,
    id)
  redis.call('SADD', K.holding, pair)
end

local function push_chunks(queue, pair, ids, batch_max)
  local size = batch_size(pair, batch_max)
  for j = 1, #ids, size do
    local chunk = {}
    for k = j, math.min(j + size - 1, #ids) do chunk[#chunk + 1] = ids[k] end
    enqueue(queue, pair, chunk)
  end
end

-- Queue the groups' pairs (one message per batch), or hold them if their handler is held.
local function flush(groups, batch_max)
  for _, g in ipairs(groups.keys) do
    local sep = string.find(g, '\n', 1, true)
    local pair, queue = string.sub(g, 1, sep - 1), string.sub(g, sep + 1)
    local ids = groups.ids[g]
    if hold_of(pair) then
      for _, id in ipairs(ids) do to_held(K.ev .. id, id, pair, queue, 'queued') end
    else
      push_chunks(queue, pair, ids, batch_max)
    end
  end
end

-- Every pair of the event is final: its body goes, unless a record still needs it.
local function settle(id)
  local ev = K.ev .. id
  if tonumber(redis.call('HGET', ev, 'keep') or '0') > 0 then
    redis.call('EXPIRE', ev, KEEP_TTL)
    redis.call('EXPIRE', K.body .. id, KEEP_TTL)
  else
    redis.call('DEL', K.body .. id)
    redis.call('EXPIRE', ev, DONE_TTL)
  end
end

local function lock_key(base) return K.order .. base .. ':lock' end
-- A lock outlives its run's lease by the recovery interval: when a run dies, the sweep finds
-- its lease over while its lock still stands, and keeps the lock for the pair (keep_lock_for_cut_
-- run) with no moment in which another event of the entity could take it.
local LOCK_MS = LEASE + RECOVER
-- An entity's lock names the pair and the run holding it: only that run renews or releases it,
-- so a run that lost its lease cannot free the entity under the run that took over.
local function lock_value(id, pair, owner) return member(id, pair) .. '|' .. owner end

-- The owner of a lock kept for a pair whose run was cut (its lease ran out) until it runs again:
-- the cut run may have applied its effect without recording done, and an older event of the
-- entity must not be applied in between.
local CUT = '~cut'

-- Release the pair's lock if `owner`'s run holds it (or it is kept for the pair's cut run);
-- with owner nil (forget), whoever of the pair holds it.
local function release_lock(ev, id, pair, owner)
  local base = redis.call('HGET', ev, f(pair, 'e'))
  if not base then return end
  local holder = redis.call('GET', lock_key(base))
  if not holder then return end
  if (owner and (holder == lock_value(id, pair, owner) or holder == lock_value(id, pair, CUT)))
      or (not owner and string.sub(holder, 1, #member(id, pair) + 1) == member(id, pair) .. '|') then
    redis.call('DEL', lock_key(base))
  end
end

-- Keep the entity of a pair whose run was cut for it until it runs again (or ends).
local function keep_lock_for_cut_run(ev, id, pair)
  local base = redis.call('HGET', ev, f(pair, 'e'))
  if not base then return end
  local holder = redis.call('GET', lock_key(base))
  if not holder or string.sub(holder, 1, #member(id, pair) + 1) == member(id, pair) .. '|' then
    redis.call('SET', lock_key(base), lock_value(id, pair, CUT), 'EX', KEEP_TTL)
  end
end

-- A done or stale pair keeps its state and attempt only: its order entity (a customer's uuid)
-- goes, unless another run of the pair still holds the entity (one that took it over from a
-- stalled run whose late done this is): that run's heartbeat keeps it, its finish drops it.
-- A dead pair keeps it, for its replay to be ordered too (the body stays as long).
local function forget_entity(ev, id, pair)
  local base = redis.call('HGET', ev, f(pair, 'e'))
  if base then
    local holder = redis.call('GET', lock_key(base))
    if holder and string.sub(holder, 1, #member(id, pair) + 1) == member(id, pair) .. '|' then
      return
    end
  end
  redis.call('HDEL', ev, f(pair, 'e'), f(pair, 'v'))
end

local function close_pair(ev, id, pair, queue, old, new, owner)
  -- A held pair that a late run of it finished (its lease had run out) leaves the held ones.
  if old == 'held' then redis.call('ZREM', K.held .. pair, id) end
  release_lock(ev, id, pair, owner)
  set_state(ev, pair, queue, old, new)
  redis.call('HDEL', ev, f(pair, 'o'), f(pair, 'l'), f(pair, 't'))
  if new == 'done' or new == 'stale' then forget_entity(ev, id, pair) end
  redis.call('ZREM', K.due, member(id, pair))
  if redis.call('HINCRBY', ev, 'open', -1) <= 0 then settle(id) end
end

local function to_waiting(ev, id, pair, queue, old, due_ms, owner)
  release_lock(ev, id, pair, owner)
  set_state(ev, pair, queue, old, 'waiting')
  redis.call('HDEL', ev, f(pair, 'o'), f(pair, 'l'))
  redis.call('HSET', ev, f(pair, 't'), due_ms)
  redis.call('ZADD', K.due, due_ms, member(id, pair))
end

local function write_record(index, record_id, fields)
  local key = index .. ':' .. record_id
  local flat = {}
  for k, v in pairs(fields) do
    flat[#flat + 1] = k
    flat[#flat + 1] = tostring(v)
  end
  flat[#flat + 1] = 'id'
  flat[#flat + 1] = record_id
  flat[#flat + 1] = 'stored_at'
  flat[#flat + 1] = string.format('%.3f', NOW / 1000)
  redis.call('DEL', key)
  redis.call('HSET', key, unpack(flat))
  redis.call('EXPIRE', key, KEEP_TTL)
  redis.call('ZADD', index, NOW / 1000, record_id)
  redis.call('HINCRBY', K.ev .. string.match(record_id, '^[^.]+'), 'keep', 1)
end

-- A pair that will not run again by itself: its dead letter keeps what replay needs.
local function dead_letter(id, pair, queue, old, reason, error, traceback, owner, gist)
  local ev = K.ev .. id
  local meta = redis.call('HMGET', ev, 'type', 'ep', 'at', f(pair, 'a'))
  write_record(K.dead, id .. '.' .. pair, {
    event_id = id, handler = pair, queue = queue, type = meta[1] or '',
    endpoint = meta[2] or '', received_at = meta[3] or '0', reason = reason,
    error = error, traceback = traceback or '', attempts = meta[4] or '1',
    failed_at = string.format('%.3f', NOW / 1000)})
  close_pair(ev, id, pair, queue, old, 'dead', owner)
  note_failure(id, pair, meta[4] or '1', 'dead_' .. reason, error, gist)
  return meta[4] or '1'
end

-- Versions are "<created s>|<kind>|<event id>" (workers/ordering.py).
local function parse_version(v)
  local c, k, e = string.match(v, '^(-?%d+)|(%d)|(.*)$')
  return tonumber(c), tonumber(k), e
end

local function newer(c1, k1, e1, c0, k0, e0)
  if c1 ~= c0 then return c1 > c0 end
  if k1 ~= k0 then return k1 > k0 end
  return e1 > e0
end

-- Whether version 1 applies after version 0 (the entity's applied one):
-- - a newer version applies, except that deleted or cancelled stays so until a newer create;
-- - the same event applies again for another handler of the scope (same version);
-- - a delete applies after a newer update too (it was held up, by a rate limit say): applied
--   in version order the entity would be deleted now, and an update never revives it.
-- (bc, be: the newest create applied; a held-up delete older than it stays stale, as the
-- entity was created again after it.)
local function applies(c1, k1, e1, c0, k0, e0, bc, be)
  if newer(c1, k1, e1, c0, k0, e0) then return not (k0 == DELETE_KIND and k1 ~= CREATE_KIND) end
  if e1 == e0 then return k1 == k0 end
  if bc and newer(bc, CREATE_KIND, be, c1, k1, e1) then return false end
  return k1 == DELETE_KIND and k0 ~= DELETE_KIND and k0 ~= CREATE_KIND
end

-- For an ordered pair: 'busy' (another run holds the entity's lock), 'stale' (its version does
-- not apply after the entity's), or 'ok' with the lock taken for this run's lease.
local function order_check(ev, id, pair, owner)
  local base = redis.call('HGET', ev, f(pair, 'e'))
  if not base then return 'ok' end
  local holder = redis.call('GET', lock_key(base))
  -- A lock of this same pair belongs to an earlier run of it, whose lease is over (or this
  -- start would not run): it is taken over, like the pair.
  if holder and string.sub(holder, 1, #member(id, pair) + 1) ~= member(id, pair) .. '|' then
    return 'busy'
  end
  local c1, k1, e1 = parse_version(redis.call('HGET', ev, f(pair, 'v')))
  local cur = redis.call('HMGET', K.order .. base, 'created_s', 'kind', 'event_id', 'born_s',
    'born_id')
  if cur[1] and not applies(c1, k1, e1, tonumber(cur[1]), tonumber(cur[2]), cur[3],
      tonumber(cur[4]), cur[5]) then
    return 'stale'
  end
  redis.call('SET', lock_key(base), lock_value(id, pair, owner), 'PX', LOCK_MS)
  return 'ok'
end

local function order_commit(ev, pair)
  local base = redis.call('HGET', ev, f(pair, 'e'))
  if not base then return end
  local c1, k1, e1 = parse_version(redis.call('HGET', ev, f(pair, 'v')))
  local key = K.order .. base
  local cur = redis.call('HMGET', key, 'created_s', 'kind', 'event_id')
  if not cur[1] or newer(c1, k1, e1, tonumber(cur[1]), tonumber(cur[2]), cur[3]) then
    redis.call('HSET', key, 'created_s', c1, 'kind', k1, 'event_id', e1)
    if k1 == CREATE_KIND then redis.call('HSET', key, 'born_s', c1, 'born_id', e1) end
  elseif k1 == DELETE_KIND then
    -- A delete applied after a newer update: the entity is deleted from that version on, by
    -- this event (so the other handlers of the scope apply it too).
    redis.call('HSET', key, 'kind', DELETE_KIND, 'event_id', e1)
  end
  redis.call('EXPIRE', key, ORDER_TTL)
end

-- The circuit breaker of a circuit (a handler, or a destination its handlers share): a run of
-- transient failures (b.n within b.w ms, no success of the circuit between) opens it, which
-- holds its handlers; the release (release.lua) then lets one held pair through at growing
-- intervals (b.p ms, doubled up to b.m): the first success closes it, and its handlers' held
-- pairs are released. A permanent error never counts. b = {c = circuit, h = {handlers}, n, w, p, m} from the worker.
local function held_count(handlers)
  local n = 0
  for _, h in ipairs(handlers) do n = n + redis.call('ZCARD', K.held .. h) end
  return n
end

local function split_list(text)
  local out = {}
  for name in string.gmatch(text or '', '[^,]+') do out[#out + 1] = name end
  return out
end

local function open_breaker(key, c, handlers, fails, interval, class)
  redis.call('HSET', key, 'state', 'open', 'opened_at', string.format('%.3f', NOW / 1000),
    'interval', interval, 'probe_at', NOW + interval, 'fails', fails, 'error', class or '')
  redis.call('HDEL', key, 'probe')
  redis.call('SADD', K.breakers, c)
  for _, h in ipairs(handlers) do
    if not redis.call('HGET', K.hold, h) then redis.call('HSET', K.hold, h, 'breaker:' .. c) end
  end
  notice('breaker_opened', c, c .. ': ' .. fails .. ' failures in a row (' .. (class or '')
    .. '); holding ' .. table.concat(handlers, ', '), {circuit = c, handlers = handlers,
    failures = fails, error = class or '', probe_in_s = interval / 1000})
end

local function breaker_failure(b, id, pair, error)
  local key = K.breaker .. b.c
  local got = redis.call('HMGET', key, 'state', 'fails', 'times', 'probe', 'interval')
  local class = string.match(error or '', '^[^:]*')
  -- A success of any handler of the circuit ends the run (recovered(), in finish.lua).
  for _, h in ipairs(b.h) do redis.call('HSET', K.recovering, h, b.c) end
  local state = got[1] or 'closed'
  if state == 'closed' then
    -- The times of the run's last n failures: n of them within the window open it.
    local times = got[3] and cjson.decode(got[3]) or {}
    times[#times + 1] = NOW
    while #times > b.n do table.remove(times, 1) end
    local fails = tonumber(got[2] or '0') + 1
    redis.call('HSET', key, 'state', 'closed', 'fails', fails, 'times', cjson.encode(times),
      'handlers', table.concat(b.h, ','))
    if #times >= b.n and NOW - times[1] <= b.w then
      open_breaker(key, b.c, b.h, fails, b.p, class)
    end
  elseif state == 'half_open' and got[4] == member(id, pair) then
    -- The probe failed: open again, for twice as long.
    local interval = math.min(tonumber(got[5] or b.p) * 2, b.m)
    redis.call('HSET', key, 'state', 'open', 'interval', interval, 'probe_at', NOW + interval,
      'error', class or '')
    redis.call('HINCRBY', key, 'fails', 1)
    redis.call('HDEL', key, 'probe')
  else
    redis.call('HINCRBY', key, 'fails', 1)
  end
end

-- Close a circuit's breaker: its handlers are no longer held (unless an operator paused one),
-- and the release queues their held pairs at their pace. `why` is 'recovered' or 'resumed'.
local function close_breaker(c, why)
  local key = K.breaker .. c
  local got = redis.call('HMGET', key, 'state', 'handlers', 'opened_at', 'fails')
  redis.call('DEL', key)
  redis.call('SREM', K.breakers, c)
  if got[1] ~= 'open' and got[1] ~= 'half_open' then return false end
  local handlers = split_list(got[2])
  for _, h in ipairs(handlers) do
    if redis.call('HGET', K.hold, h) == 'breaker:' .. c then redis.call('HDEL', K.hold, h) end
  end
  local opened = tonumber(got[3] or '0')
  notice('breaker_closed', c, c .. ': ' .. why .. ' after ' .. math.floor(NOW / 1000 - opened)
    .. ' s; releasing ' .. held_count(handlers) .. ' held events', {circuit = c,
    handlers = handlers, why = why, open_s = NOW / 1000 - opened,
    failures = tonumber(got[4] or '0'), held = held_count(handlers)})
  return true
end

-- A success of `pair` after failures: its circuit's run of failures ends (an open breaker
-- closes), and its groups of transient failures close.
local function recovered(id, pair, circuit)
  if circuit ~= '' then
    local state = redis.call('HGET', K.breaker .. circuit, 'state')
    if state == 'open' or state == 'half_open' then
      close_breaker(circuit, 'recovered')
    else
      redis.call('DEL', K.breaker .. circuit)
    end
  end
  for _, gid in ipairs(redis.call('SMEMBERS', K.fgroup .. 'open:' .. pair)) do
    end_group(gid, 'closed', 'recovery')
  end
  redis.call('DEL', K.fgroup .. 'open:' .. pair)
  redis.call('HDEL', K.recovering, pair)
end
