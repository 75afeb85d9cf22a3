-- 209_plain_env_values_as_text.sql: a legacy plaintext value that is not a JSON string
-- is sealed as the text it was deployed as, not rewritten.
--
-- Before the environment was sealed (060), the app was given each value of
-- environment_vars as jsonb_each_text gives it: a number as written (1.10,
-- 123456789012345678), true, an object's JSON text. The worker that seals the column
-- (instance_plain_env, then instance_plain_env_put for each value, then
-- instance_plain_env_sealed) parsed what it read as JSON and printed each value that
-- was not a string back from its parsed form, a double: 123456789012345678 became
-- 1.2345678901234568e+17 and 1.10 became 1.1. That text was sealed, deployed, and the
-- column emptied: the value the instance ran with was lost.
--
-- Now instance_plain_env hands the worker every value as text, as jsonb_each_text
-- gives it (a JSON null stays null), so a value is a JSON string the worker seals as
-- it is. instance_plain_env_sealed compares the digest it is given with the digest
-- of that same text of the column, which is what the worker read (a worker built
-- before this migration hashes the text it read too, now this one). A column that is
-- not an object reads as {} and, once that is acknowledged, is emptied.
--
-- public.instance_plain_env_values (new) is that rule, once, and
-- public.instance_plain_env_sha256 (new) the digest of it that names what was read.
-- Redefines public.instance_plain_env (123_plain_env_sealed_first.sql) and
-- public.instance_plain_env_sealed(uuid, text) (199_plain_env_sealed_by_digest.sql),
-- whole; CREATE OR REPLACE keeps their grants.

-- environment_vars' values as the app was given them before they were sealed
-- (jsonb_each_text), as an object of strings; {} when it is not an object.
CREATE FUNCTION public.instance_plain_env_values(p_vars jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
    SELECT CASE WHEN jsonb_typeof(p_vars) = 'object'
                THEN coalesce((SELECT pg_catalog.jsonb_object_agg(e.key, e.value)
                                 FROM pg_catalog.jsonb_each_text(p_vars) e), '{}'::jsonb)
                ELSE '{}'::jsonb END
$$;
REVOKE ALL ON FUNCTION public.instance_plain_env_values(jsonb) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_plain_env_values(jsonb) TO service_role;

-- The lowercase hex SHA-256 of environment_vars as the worker reads it
-- (instance_plain_env's text): how the worker names what it read.
CREATE FUNCTION public.instance_plain_env_sha256(p_vars jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
    SELECT pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
               public.instance_plain_env_values(p_vars)::text, 'UTF8')), 'hex')
$$;
REVOKE ALL ON FUNCTION public.instance_plain_env_sha256(jsonb) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_plain_env_sha256(jsonb) TO service_role;

CREATE OR REPLACE FUNCTION public.instance_plain_env(p_instance_id uuid)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT public.instance_plain_env_values(i.environment_vars)
      FROM public.instances i WHERE i.id = p_instance_id;
$$;

CREATE OR REPLACE FUNCTION public.instance_plain_env_sealed(p_instance_id uuid, p_was_sha256 text)
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
    IF public.instance_plain_env_sha256(v) IS DISTINCT FROM p_was_sha256 THEN
        RETURN false;
    END IF;
    UPDATE public.instances SET environment_vars = '{}'::jsonb WHERE id = p_instance_id;
    RETURN true;
END;
$$;
