-- 126_take_plain_env_kept.sql: instance_take_plain_env is back, for the lifecycle
-- workers built before 123 that still run during an upgrade.
--
-- An upgrade applies the new migrations while the previous release's binaries
-- still run (docs/install.md, Upgrade). 123 dropped instance_take_plain_env, which
-- the worker built before 123 calls for every step of an instance with a legacy
-- plaintext environment_vars: between the migration and the restart that worker's
-- steps failed. This release's worker never calls it (it reads with
-- instance_plain_env and empties with instance_plain_env_sealed, 123); it is kept
-- only for binaries built before 123, and a later release drops it once no
-- supported upgrade starts from one of those (docs/schema.md, Upgrades).
--
-- Copied whole from its last definition (060_instance.sql), with the same grants;
-- only the comment above it differs.

-- Kept for lifecycle workers built before 123 (this release's worker does not call
-- it). The legacy plaintext environment_vars of an instance, handed to the worker
-- once so it can seal them into instance_secrets; the column is emptied in the same
-- call. (New secrets never pass through it; emptying it is not a configuration
-- change: the same values now come from instance_secrets.)
CREATE FUNCTION public.instance_take_plain_env(p_instance_id uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v jsonb;
BEGIN
    SELECT environment_vars INTO v FROM public.instances WHERE id = p_instance_id FOR UPDATE;
    UPDATE public.instances SET environment_vars = '{}'::jsonb
     WHERE id = p_instance_id AND environment_vars IS DISTINCT FROM '{}'::jsonb;
    RETURN CASE WHEN jsonb_typeof(v) = 'object' THEN v ELSE '{}'::jsonb END;
END;
$$;

REVOKE ALL ON FUNCTION public.instance_take_plain_env(uuid) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_take_plain_env(uuid) TO service_role;
