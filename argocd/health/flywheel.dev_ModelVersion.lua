-- Argo CD health of a flywheel.dev ModelVersion: an immutable record, Healthy once it exists
-- with a content digest for its artifact.
local function integer(v)
  if type(v) == "number" and math.floor(v) == v then
    return string.format("%d", v)
  end
  return tostring(v)
end

local hs = {}
local artifact = obj.spec ~= nil and obj.spec.artifact or nil
if artifact ~= nil and artifact.digest ~= nil and artifact.digest ~= "" then
  hs.status = "Healthy"
  hs.message = (obj.spec.modelName or "model") .. " v" .. integer(obj.spec.version or "?")
    .. ": " .. artifact.digest
  return hs
end
hs.status = "Degraded"
hs.message = "spec.artifact.digest is not set"
return hs
