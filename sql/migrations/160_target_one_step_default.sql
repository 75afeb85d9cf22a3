-- 160_target_one_step_default.sql: a new provisioner target runs one step at a time
-- unless told otherwise.
--
-- A step holds its worker for as long as the target takes to answer, up to
-- MR_PROVISION_TIMEOUT_MS (610 s). A target that accepts connections and never
-- answers (a wedged Dokku host) therefore held up to its max_in_flight workers for
-- that long a step, again at each retry; with the default of 4 and the worker's
-- default of two processes a host, that was every worker, and the other targets'
-- work (sign-ups, restarts) waited behind it. A target now gets at most one worker
-- unless its limit is raised (mindroomctl target add|set --max-in-flight): keep each
-- target's limit below the number of workers across all hosts.
--
-- Only the default changes: targets registered before keep the limit they have.

ALTER TABLE public.provisioner_targets ALTER COLUMN max_in_flight SET DEFAULT 1;
