-- Right to erasure: events erased with every trace, their open work dropped (it will not run:
-- a message that still names them finds nothing). ARGV[7..] event ids.
-- Returns {events erased, open pairs dropped, records removed}.
local erased, dropped, records = 0, 0, 0
for i = 7, #ARGV do
  local id = ARGV[i]
  local ev = K.ev .. id
  local fields = redis.call('HGETALL', ev)
  for j = 1, #fields, 2 do
    local name, value = fields[j], fields[j + 1]
    if string.sub(name, -2) == '/s' then
      local pair = string.sub(name, 1, -3)
      if not FINAL[value] then
        release_lock(ev, id, pair, nil)
        set_state(ev, pair, redis.call('HGET', ev, f(pair, 'q')), value, 'forgotten')
        redis.call('ZREM', K.due, member(id, pair))
        redis.call('ZREM', K.held .. pair, id)
        dropped = dropped + 1
      end
      records = records + redis.call('DEL', K.dead .. ':' .. id .. '.' .. pair)
      redis.call('ZREM', K.dead, id .. '.' .. pair)
    end
  end
  records = records + redis.call('DEL', K.parked .. ':' .. id)
  redis.call('ZREM', K.parked, id)
  erased = erased + redis.call('EXISTS', ev)
  redis.call('DEL', ev, K.body .. id, K.trail .. id)
  redis.call('ZREM', K.trail_index, id)
end
return {erased, dropped, records}
