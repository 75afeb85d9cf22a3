-- 199_plain_env_sealed_by_digest.sql: the worker names the legacy plaintext
-- environment it sealed by its SHA-256, not by sending the values back.
--
-- instance_plain_env_sealed(uuid, jsonb) (123) took what the worker had read and
-- sealed, the plaintext values themselves, as a statement parameter: a server that
-- logs statements with their parameters (log_statement = 'all', or a slow-statement
-- log) wrote every legacy secret into its log at each move. It now takes the
-- lowercase hex SHA-256 of the text the worker read (public.instance_plain_env(id)
-- as text, which is the column's jsonb output); the rule is unchanged: the column is
-- emptied only while it still holds what was read and sealed.
--
-- A new signature beside the old one, which stays for the worker built before this
-- migration while an upgrade runs (docs/schema.md), now the same rule through the
-- new one; a later release drops it. The log then holds a digest of the whole
-- object, which tells its values only to someone who can guess every one of them.

-- Empties environment_vars once its values are sealed into instance_secrets, only
-- while its text (jsonb's output, as instance_plain_env reads it) still has the
-- SHA-256 p_was_sha256 (64 lowercase hex digits). true when emptied (or already
-- empty).
CREATE FUNCTION public.instance_plain_env_sealed(p_instance_id uuid, p_was_sha256 text)
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
    IF pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(v::text, 'UTF8')), 'hex')
       IS DISTINCT FROM p_was_sha256 THEN
        RETURN false;
    END IF;
    UPDATE public.instances SET environment_vars = '{}'::jsonb WHERE id = p_instance_id;
    RETURN true;
END;
$$;

REVOKE ALL ON FUNCTION public.instance_plain_env_sealed(uuid, text) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_plain_env_sealed(uuid, text) TO service_role;

-- The worker built before this migration sends back the text it read, as jsonb: the
-- same rule, by that text's digest (jsonb prints the text it was read from, which
-- jsonb printed, unchanged).
CREATE OR REPLACE FUNCTION public.instance_plain_env_sealed(p_instance_id uuid, p_was jsonb)
RETURNS boolean
LANGUAGE sql VOLATILE
SET search_path = ''
AS $$
    SELECT public.instance_plain_env_sealed(p_instance_id,
               pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(p_was::text, 'UTF8')), 'hex'))
$$;
