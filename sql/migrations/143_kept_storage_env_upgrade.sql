-- 143_kept_storage_env_upgrade.sql: during an upgrade, the lifecycle worker built
-- before 139 loses no variable of a destroyed instance whose kept storage a new
-- instance took over.
--
-- 139 carries a destroyed instance's operator variables into the instance that took
-- its storage over, in the call that stores the new instance's homeserver keys (the
-- four-argument instance_secrets_issue), and only then: once the new instance has
-- keys, its steps carry no predecessor. The worker built before 139, still running
-- while an upgrade applies the migrations (docs/schema.md, Upgrades), stores those
-- keys with the three-argument function and knows nothing of the variables: MindRoom
-- came back on its old data without its model providers' API keys, for good, though
-- this release's worker would have carried them.
--
-- Now the three-argument function refuses to store the homeserver keys of an
-- instance whose step carries a predecessor's variables (lifecycle_step_json's
-- rule: public.instance_carries_env), with SQLSTATE 55000 and nothing stored. That
-- worker retries a step whose secrets cannot be prepared with backoff, so the step
-- waits for a worker of this release, which carries them. Every other call does
-- exactly what it did.
--
-- Redefines public.instance_secrets_issue(uuid, jsonb, jsonb)
-- (113_step_secrets.sql), unchanged but for the IF before instance_homeserver_keys.
-- CREATE OR REPLACE keeps its grants.

-- Whether the instance's step now carries the variables of the instance whose
-- storage it took over (lifecycle_step_json's "predecessor" has "env").
-- SECURITY DEFINER: lifecycle_step_json is its callers' own.
CREATE FUNCTION public.instance_carries_env(p_instance_id uuid)
RETURNS boolean
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT coalesce((public.lifecycle_step_json(i) -> 'predecessor') ? 'env', false)
      FROM public.instances i WHERE i.id = p_instance_id
$$;
REVOKE ALL ON FUNCTION public.instance_carries_env(uuid) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_carries_env(uuid) TO service_role;

CREATE OR REPLACE FUNCTION public.instance_secrets_issue(p_instance_id uuid, p_token jsonb, p_homeserver jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_token text;
    v_keys jsonb;
BEGIN
    -- Keys stored here would end the carrying of a predecessor's variables, which
    -- only the four-argument function does.
    IF p_homeserver IS NOT NULL AND public.instance_carries_env(p_instance_id) THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = 'the variables of the instance whose storage this one took over are '
                      'carried by the lifecycle worker of this release: retried';
    END IF;
    IF p_token IS NOT NULL THEN
        v_token := public.instance_token_issue(p_instance_id, p_token->>'key_id', p_token->>'hash',
                                               p_token->>'ciphertext', p_token->>'digest');
    END IF;
    IF p_homeserver IS NOT NULL THEN
        v_keys := public.instance_homeserver_keys(p_instance_id, p_homeserver);
    END IF;
    RETURN jsonb_build_object('token', v_token, 'homeserver', v_keys);
END;
$$;
