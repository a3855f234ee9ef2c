-- Argo CD health of a flywheel.dev Model (a registry entry). The operator records its last
-- promotion decision as the condition type Promoted. Status False with reason GatesFailed
-- (or any reason but AliasPinned) means the newest candidate was blocked, and the message
-- names the failed gates: that is Degraded, so a blocked promotion shows on the Application.
-- AliasPinned is a deliberate rollback by hand, so it stays Healthy; so does everything else.
local function integer(v)
  if type(v) == "number" and math.floor(v) == v then
    return string.format("%d", v)
  end
  return tostring(v)
end

local hs = {}
local status = obj.status or {}
local pinned = nil
if status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.type == "Promoted" and c.status == "False" then
      if c.reason == "AliasPinned" then
        pinned = c.message or "the alias is pinned"
      else
        hs.status = "Degraded"
        hs.message = "Promotion blocked (" .. (c.reason or "GatesFailed") .. ")"
        if c.message ~= nil and c.message ~= "" then
          hs.message = hs.message .. ": " .. c.message
        end
        return hs
      end
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
if pinned ~= nil then
  hs.message = hs.message .. " (" .. pinned .. ")"
end
return hs
