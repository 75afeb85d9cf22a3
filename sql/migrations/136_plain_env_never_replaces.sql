-- 136_plain_env_never_replaces.sql: a legacy plaintext value never replaces a sealed one.
--
-- The worker sealed each value of an instance's legacy plaintext environment_vars
-- with instance_secret_put, an upsert, and sent it. A value set since with
-- `mindroomctl env set` (mr-secrets), whose update is the very step that moves the
-- column, was overwritten by the stale legacy value, in instance_secrets and on the
-- app: an operator's rotation of a leaked key was silently undone. The same
-- happened when a worker was stopped between storing the values and emptying the
-- column and a value was set before the step ran again. A sealed value is always
-- newer than the column (nothing writes the column any more), so:
--
-- 1. The worker stores a legacy value with instance_plain_env_put, which only
--    inserts, and sends what it answers: the value in force (the legacy one when
--    none was sealed, else the sealed one). The column is still emptied afterwards
--    (instance_plain_env_sealed, 123).
-- 2. instance_take_plain_env, kept for the worker built before 123 (126), hands it
--    only the names that have no sealed value (that worker stores what it is given
--    with instance_secret_put). It still empties the whole column. Redefined whole
--    from 126; only the RETURN line and the comment above the function differ.

-- Stores one legacy plaintext value, sealed, under kind env unless the instance
-- already has a sealed value of that name. Not a configuration change (the same
-- value, or none, reaches the app). Returns the ciphertext in force for that name,
-- NULL if it was removed meanwhile.
CREATE FUNCTION public.instance_plain_env_put(p_instance_id uuid, p_name text,
                                              p_ciphertext text, p_digest text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v text;
BEGIN
    INSERT INTO public.instance_secrets (instance_id, kind, name, ciphertext, digest)
    VALUES (p_instance_id, 'env', p_name, p_ciphertext, p_digest)
    ON CONFLICT (instance_id, kind, name) DO NOTHING;
    SELECT s.ciphertext INTO v FROM public.instance_secrets s
     WHERE s.instance_id = p_instance_id AND s.kind = 'env' AND s.name = p_name;
    RETURN v;
END;
$$;

REVOKE ALL ON FUNCTION public.instance_plain_env_put(uuid, text, text, text) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_plain_env_put(uuid, text, text, text) TO service_role;

-- Kept for lifecycle workers built before 123 (this release's worker does not call
-- it). The legacy plaintext environment_vars of an instance, handed to the worker
-- once so it can seal them into instance_secrets, without the names that already
-- have a sealed value (newer than the column: that worker's store would replace
-- it); the whole column is emptied in the same call. (New secrets never pass
-- through it; emptying it is not a configuration change: the same values now come
-- from instance_secrets.)
CREATE OR REPLACE FUNCTION public.instance_take_plain_env(p_instance_id uuid)
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
    RETURN CASE WHEN jsonb_typeof(v) = 'object' THEN (
        SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}'::jsonb) FROM jsonb_each(v) e
         WHERE NOT EXISTS (SELECT 1 FROM public.instance_secrets s
                            WHERE s.instance_id = p_instance_id AND s.kind = 'env'
                              AND s.name = e.key)) ELSE '{}'::jsonb END;
END;
$$;

REVOKE ALL ON FUNCTION public.instance_take_plain_env(uuid) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_take_plain_env(uuid) TO service_role;
