-- Argo CD health of a flywheel.dev Model (a registry entry). The operator records its last
-- promotion decision as the condition type Promoted: status False means the candidate was
-- blocked, and the condition's message names the failed gates. That is Degraded, so a
-- blocked promotion shows on the Application; otherwise the Model is Healthy.
local function integer(v)
  if type(v) == "number" and math.floor(v) == v then
    return string.format("%d", v)
  end
  return tostring(v)
end

local hs = {}
local status = obj.status or {}
if status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.type == "Promoted" and c.status == "False" then
      hs.status = "Degraded"
      local reason = c.reason or "PromotionBlocked"
      hs.message = "Promotion blocked (" .. reason .. ")"
      if c.message ~= nil and c.message ~= "" then
        hs.message = hs.message .. ": " .. c.message
      end
      return hs
    end
  end
end

hs.status = "Healthy"
local aliases = {}
if status.aliases ~= nil then
  for name, target in pairs(status.aliases) do
    table.insert(aliases, name .. " -> v" .. integer(target.version))
  end
end
if #aliases == 0 then
  hs.message = "No versions registered yet"
else
  table.sort(aliases)
  hs.message = table.concat(aliases, ", ")
end
return hs
