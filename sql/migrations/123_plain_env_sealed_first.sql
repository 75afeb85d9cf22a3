-- 123_plain_env_sealed_first.sql: a legacy plaintext environment is emptied only once
-- every value of it is sealed and stored.
--
-- instance_take_plain_env (060_instance.sql) handed the worker an instance's
-- plaintext environment_vars and emptied the column in the same call, committed
-- before the worker sealed and stored each value (instance_secret_put, a call
-- each). A value whose store failed (a name instance_secrets refuses, a dropped
-- connection, a statement timeout) and every one after it existed only in the
-- worker's memory and was lost. The worker now reads the column
-- (instance_plain_env), stores every value, and then empties it with
-- instance_plain_env_sealed, which does so only while the column still holds what
-- was read (otherwise the next step seals what changed). A failure leaves the
-- column as it was, and the step fails with the reason.

DROP FUNCTION public.instance_take_plain_env(uuid);

-- The legacy plaintext environment_vars of an instance, as an object ({} if none).
CREATE FUNCTION public.instance_plain_env(p_instance_id uuid)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT CASE WHEN jsonb_typeof(i.environment_vars) = 'object' THEN i.environment_vars
                ELSE '{}'::jsonb END
      FROM public.instances i WHERE i.id = p_instance_id;
$$;

-- Empties environment_vars once its values are sealed into instance_secrets, only
-- while it still holds p_was (what was read and sealed). Not a configuration change:
-- the same values now come from instance_secrets. true when emptied (or already
-- empty).
CREATE FUNCTION public.instance_plain_env_sealed(p_instance_id uuid, p_was jsonb)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v jsonb;
BEGIN
    SELECT environment_vars INTO v FROM public.instances WHERE id = p_instance_id FOR UPDATE;
    IF v IS NULL OR v = '{}'::jsonb THEN
        RETURN true;
    END IF;
    IF v IS DISTINCT FROM p_was THEN
        RETURN false;
    END IF;
    UPDATE public.instances SET environment_vars = '{}'::jsonb WHERE id = p_instance_id;
    RETURN true;
END;
$$;

DO $grants$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'public.instance_plain_env(uuid)',
        'public.instance_plain_env_sealed(uuid, jsonb)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
    END LOOP;
END
$grants$;
