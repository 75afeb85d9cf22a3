-- 113_step_secrets.sql: the secrets a step stores before its provisioner call, in
-- one call.
--
-- A first deploy needs a new control-plane token and the homeserver's keys, each
-- generated and sealed by the worker and stored before the provisioner ever sees
-- them (so a retry sends the same ones). They were two calls, two transactions
-- (instance_token_issue, then instance_homeserver_keys); now one, which runs both
-- functions unchanged: the first of two racing workers still wins each, and the
-- answer is what is in force. p_token is {"key_id", "hash", "ciphertext", "digest"}
-- or NULL (the instance has a live token); p_homeserver the rows
-- instance_homeserver_keys takes, or NULL (its keys are stored). Returns
-- {"token": ciphertext or null, "homeserver": {"name": ciphertext} or null}.

CREATE FUNCTION public.instance_secrets_issue(p_instance_id uuid, p_token jsonb, p_homeserver jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_token text;
    v_keys jsonb;
BEGIN
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

REVOKE ALL ON FUNCTION public.instance_secrets_issue(uuid, jsonb, jsonb) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_secrets_issue(uuid, jsonb, jsonb) TO service_role;
