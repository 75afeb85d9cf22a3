-- 210_plain_env_unset_during_move.sql: a variable unset while the worker moves the legacy
-- plaintext environment stays unset.
--
-- The worker reads environment_vars (instance_plain_env), then stores each value with
-- instance_plain_env_put, one call each, then empties the column
-- (instance_plain_env_sealed). `mindroomctl env unset X` (instance_secret_delete)
-- committed between the read and X's store removed X from the column and from
-- instance_secrets, answered "removed", and owed an update; the store then found no
-- sealed X and inserted the legacy value read before. The step failed on the
-- changed column, but the next one, and the update the unset owed, deployed X from
-- instance_secrets, and `env list` showed it again: an operator removing a leaked key
-- was told it was gone while it stayed on the app.
--
-- Now:
-- - instance_plain_env_put(id, name, ciphertext, digest, was_sha256) (new, what this
--   worker calls) stores a legacy value only while the column still reads as what the
--   worker read (instance_plain_env_sha256, as instance_plain_env_sealed takes it),
--   under a share lock of the instance's row: then it is the four-argument store
--   (136); otherwise it stores nothing and answers the value in force (NULL when none: the step then fails on the
--   changed column, and the next one reads it again);
-- - instance_secret_delete locks the instance's row before it deletes, so a store that
--   holds the lock is committed before the delete looks (and is deleted with it), and
--   one that waits for it sees the column without the name.
-- The four-argument instance_plain_env_put stays as it was, for the worker built
-- before this migration while an upgrade runs.
--
-- Redefines public.instance_secret_delete (140_failed_owes_restart.sql) whole: only
-- the lock before the DELETE is new. CREATE OR REPLACE keeps its grants.

CREATE FUNCTION public.instance_plain_env_put(p_instance_id uuid, p_name text, p_ciphertext text,
                                              p_digest text, p_was_sha256 text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_vars jsonb;
    v text;
BEGIN
    SELECT i.environment_vars INTO v_vars FROM public.instances i
     WHERE i.id = p_instance_id FOR SHARE;
    IF FOUND AND public.instance_plain_env_sha256(v_vars) = p_was_sha256 THEN
        RETURN public.instance_plain_env_put(p_instance_id, p_name, p_ciphertext, p_digest);
    END IF;
    SELECT s.ciphertext INTO v FROM public.instance_secrets s
     WHERE s.instance_id = p_instance_id AND s.kind = 'env' AND s.name = p_name;
    RETURN v;
END;
$$;

REVOKE ALL ON FUNCTION public.instance_plain_env_put(uuid, text, text, text, text) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_plain_env_put(uuid, text, text, text, text) TO service_role;

CREATE OR REPLACE FUNCTION public.instance_secret_delete(p_instance_id uuid, p_kind text, p_name text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_sealed boolean;
BEGIN
    PERFORM 1 FROM public.instances WHERE id = p_instance_id FOR NO KEY UPDATE;
    DELETE FROM public.instance_secrets
     WHERE instance_id = p_instance_id AND kind = p_kind AND name = p_name;
    v_sealed := FOUND;
    UPDATE public.instances SET
           environment_vars = CASE WHEN p_kind = 'env' AND jsonb_typeof(environment_vars) = 'object'
                                   THEN environment_vars - p_name ELSE environment_vars END,
           config_version = config_version + 1
     WHERE id = p_instance_id
       AND (v_sealed OR (p_kind = 'env' AND jsonb_typeof(environment_vars) = 'object'
                         AND environment_vars ? p_name));
    RETURN FOUND;
END;
$$;
