-- Argo CD health of a flywheel.dev FineTuneRun, from status.phase (written by the operator):
--   Succeeded -> Healthy, Failed -> Degraded (with the operator's message),
--   Pending, Running, Suspended, or no status yet -> Progressing.
local function condition(status, type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the run"
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = status.message or "The run succeeded"
  if status.modelVersion ~= nil then
    hs.message = hs.message .. "; produced ModelVersion " .. status.modelVersion
  end
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  local failed = condition(status, "Failed")
  hs.message = status.message or (failed and failed.message) or "The run failed"
  return hs
end

-- Pending, Running and Suspended (and any phase a newer operator adds) are still in motion.
hs.status = "Progressing"
local message = status.message or phase
local scheduled = condition(status, "Scheduled")
if scheduled ~= nil and scheduled.status == "False" and scheduled.message ~= nil then
  message = message .. " (" .. scheduled.message .. ")"
end
if status.observedGeneration ~= nil and obj.metadata.generation ~= nil
    and status.observedGeneration < obj.metadata.generation then
  message = message .. "; the operator has not yet seen generation " .. obj.metadata.generation
end
hs.message = phase .. ": " .. message
return hs
