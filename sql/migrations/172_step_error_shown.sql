-- 172_step_error_shown.sql: a tenant is told about a failed step of its running
-- instance for as long as it fails, and health.error is the health checks' alone.
--
-- A failed update, stop or restart leaves the instance running, and lifecycle_finish
-- wrote its text into error_message, which my-instance shows as health.error while
-- the instance runs: the step's failure was shown as the health checks' until their
-- next round, which then wrote its own (healthy: nothing) while the step still
-- failed.
--
-- - lifecycle_finish leaves error_message to the health checks while the instance
--   runs; an instance the failure leaves not running gets the step's text as before.
-- - my-instance's instance.error tells the owed step while it fails (attempts > 0,
--   which its success resets; "waits for an operator" while its action is held), in
--   public.instance_step_error's words, the one place for them; else, for an
--   instance that is not running, error_message as before. tenant_instance runs as
--   the tenant, who may now execute instance_step_error (a function of its
--   arguments alone) and still reads neither last_error nor anything it did not.
-- - Rows written before: a running instance's error_message that is its failing
--   step's text is cleared (the health checks write theirs at their next round).
--
-- Redefines (CREATE OR REPLACE keeps their grants), each unchanged but for the lines
-- named: public.lifecycle_finish (171_tenant_error_text.sql: v_leaves_status and the
-- failure's error_message) and public.tenant_instance (171_tenant_error_text.sql: the
-- instance's "error").

GRANT EXECUTE ON FUNCTION public.instance_step_error(public.lifecycle_action, boolean)
    TO authenticated;

CREATE OR REPLACE FUNCTION public.lifecycle_finish(p_instance_id uuid, p_token text, p_result jsonb,
                                                   p_lease_s integer, p_backoff_base_s integer,
                                                   p_backoff_cap_s integer)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    i public.instances;
    v_action public.lifecycle_action;
    v_ok boolean := coalesce((p_result->>'ok')::boolean, false);
    v_rejected boolean := coalesce((p_result->>'rejected')::boolean, false);
    v_error text := left(coalesce(p_result->>'error', 'unknown error'), 1000);
    v_retry double precision := (p_result->>'retry_in_s')::double precision;
    v_target public.instance_status;
    v_account uuid;
    v_email jsonb;
    v_restarted boolean;
    -- A failed update, stop or restart leaves the app as it was: still running.
    v_leaves_status boolean;
BEGIN
    SELECT * INTO i FROM public.instances WHERE id = p_instance_id FOR UPDATE;
    IF FOUND AND i.claimed_by IS NOT NULL AND i.claimed_by IS DISTINCT FROM p_token
       AND i.claim_chained_from = p_token THEN
        -- A retry of a call that committed and chained the next step (its answer
        -- lost with the connection): the same answer again, the chained step.
        RETURN jsonb_build_object('outcome', 'claimed',
                                  'instance', public.lifecycle_instance_json(i),
                                  'step', public.lifecycle_step_json(i));
    END IF;
    IF NOT FOUND OR i.claimed_by IS DISTINCT FROM p_token THEN
        RETURN jsonb_build_object('outcome', 'lost',
            'instance', CASE WHEN FOUND THEN public.lifecycle_instance_json(i) END);
    END IF;
    v_action := i.claim_action;
    v_leaves_status := v_action IN ('update', 'stop', 'destroy_storage', 'restart');
    IF v_rejected THEN
        v_error := 'rejected: ' || v_error;
    END IF;
    SELECT s.account_id INTO v_account FROM public.subscriptions s WHERE s.id = i.subscription_id;

    IF v_action = 'email' THEN
        v_email := p_result;
    ELSIF v_ok AND v_action = 'destroy_storage' THEN
        UPDATE public.instances SET storage_destroyed_at = now(),
               error_message = NULL, last_error = NULL, attempts = 0, next_attempt_at = NULL
         WHERE id = i.id RETURNING * INTO i;
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (v_account, 'instance.storage_destroyed', jsonb_build_object(
            'instance_id', i.id, 'app', i.dokku_app_name, 'purged', i.purge_requested));
    ELSIF v_ok THEN
        -- A restart happened when the step says it carried out a restart version not
        -- yet applied: a restart or a start of both apps, a create that gave every app
        -- new processes (the worker sends restart_version only then).
        v_restarted := v_action IN ('create', 'start', 'restart')
                       AND coalesce((p_result->>'restart_version')::bigint > i.applied_restart_version, false);
        v_target := CASE v_action
                        WHEN 'stop' THEN 'stopped'::public.instance_status
                        WHEN 'destroy' THEN 'deprovisioned'::public.instance_status
                        ELSE 'running'::public.instance_status END;
        -- The row may have moved on while we held the lease (an operator marked it
        -- for destruction): then the outcome is recorded, the newer intent stays,
        -- and the next step follows from it.
        UPDATE public.instances SET
               status = CASE WHEN public.instance_transition_allowed(status, v_target)
                             THEN v_target ELSE status END,
               backend_url = coalesce(p_result->>'backend_url', backend_url),
               frontend_url = coalesce(p_result->>'frontend_url', frontend_url),
               matrix_server_url = coalesce(p_result->>'matrix_server_url', matrix_server_url),
               matrix_server_name = coalesce(matrix_server_name, p_result->>'matrix_server_name'),
               provisioned_at = CASE WHEN v_action IN ('create', 'start', 'update')
                                     THEN coalesce(provisioned_at, now()) ELSE provisioned_at END,
               deprovisioned_at = CASE WHEN v_action = 'destroy' THEN now() ELSE deprovisioned_at END,
               -- A purge asked while the destroy ran (its step kept the data) is due now.
               storage_destroy_after = CASE WHEN v_action = 'destroy' AND purge_requested THEN now()
                   WHEN v_action = 'destroy' THEN
                   now() + make_interval(secs => coalesce((p_result->>'retention_s')::double precision, 0))
                   ELSE storage_destroy_after END,
               storage_destroyed_at = CASE WHEN v_action = 'destroy' AND coalesce((p_result->>'purged')::boolean, false)
                                           THEN now() ELSE storage_destroyed_at END,
               applied_config_version = CASE WHEN v_action IN ('create', 'update', 'start')
                                              AND p_result ? 'config_version'
                                             THEN (p_result->>'config_version')::bigint
                                             ELSE applied_config_version END,
               applied_restart_version = CASE WHEN v_restarted
                                              THEN (p_result->>'restart_version')::bigint
                                              ELSE applied_restart_version END,
               restarted_at = CASE WHEN v_restarted THEN now() ELSE restarted_at END,
               dry_run = CASE WHEN v_action IN ('create', 'update', 'start', 'restart')
                                   AND p_result ? 'dry_run'
                              THEN coalesce((p_result->>'dry_run')::boolean, false)
                              ELSE dry_run END,
               error_message = NULL, last_error = NULL, attempts = 0, next_attempt_at = NULL
         WHERE id = i.id RETURNING * INTO i;
        IF v_action = 'destroy' AND i.storage_destroyed_at IS NOT NULL THEN
            INSERT INTO public.audit_logs (account_id, action, details)
            VALUES (v_account, 'instance.storage_destroyed', jsonb_build_object(
                'instance_id', i.id, 'app', i.dokku_app_name, 'purged', true));
        END IF;
        IF v_restarted THEN
            INSERT INTO public.audit_logs (account_id, action, details)
            VALUES (v_account, 'instance.restarted', jsonb_build_object(
                'instance_id', i.id, 'restart_version', i.applied_restart_version));
        END IF;
    ELSE
        UPDATE public.instances SET
               status = CASE WHEN v_leaves_status THEN status
                             WHEN public.instance_transition_allowed(status, 'failed') THEN 'failed'
                             ELSE status END,
               -- The tenant reads error_message: what failed and what happens next,
               -- never the provisioner's text (last_error, the operators'). While the
               -- instance runs, it is the health checks' (my-instance's health.error);
               -- the failed step is told as instance.error (tenant_instance).
               error_message = CASE WHEN v_leaves_status AND status = 'running' THEN error_message
                                    ELSE public.instance_step_error(v_action, v_rejected) END,
               last_error = v_error,
               attempts = attempts + 1,
               next_attempt_at = CASE WHEN v_rejected THEN NULL ELSE
                   now() + make_interval(secs => coalesce(v_retry,
                       least(p_backoff_cap_s::double precision,
                             p_backoff_base_s * power(2, least(attempts, 30))))) END
         WHERE id = i.id RETURNING * INTO i;
    END IF;

    -- The welcome email comes next and is due, and the worker said what its step
    -- would give now (it cannot send it): that is its outcome.
    IF v_email IS NULL AND v_ok AND i.owed_action = 'email'
       AND (i.welcome_email_next_at IS NULL OR i.welcome_email_next_at <= now())
       AND jsonb_typeof(p_result->'welcome_email') = 'object' THEN
        v_email := p_result->'welcome_email';
    END IF;
    -- The email is the last step of a chain: its update gives the lease back too
    -- (taken again below in the rare case that something else is due now).
    IF v_email IS NOT NULL THEN
        IF coalesce((v_email->>'ok')::boolean, false) THEN
            UPDATE public.instances SET welcome_email_sent_at = now(),
                   welcome_email_error = NULL, welcome_email_next_at = NULL,
                   claimed_by = NULL, claim_expires_at = NULL, claim_action = NULL
             WHERE id = i.id RETURNING * INTO i;
        ELSE
            UPDATE public.instances SET
                   claimed_by = NULL, claim_expires_at = NULL, claim_action = NULL,
                   welcome_email_attempts = welcome_email_attempts + 1,
                   welcome_email_error = CASE WHEN coalesce((v_email->>'rejected')::boolean, false)
                                              THEN 'rejected: ' ELSE '' END
                                         || left(coalesce(v_email->>'error', 'unknown error'), 1000),
                   welcome_email_next_at = now() + make_interval(secs => coalesce(
                       (v_email->>'retry_in_s')::double precision,
                       least(p_backoff_cap_s::double precision,
                             p_backoff_base_s * power(2, least(welcome_email_attempts, 30)))))
             WHERE id = i.id RETURNING * INTO i;
        END IF;
    END IF;

    -- Chain the next step while the lease is ours, when it is due now, is not the
    -- step just done, and does not wait for its target (a disabled one, a purge or a
    -- teardown first); the slot this lease holds on its target is the step's own,
    -- unless the step just done was the welcome email, which holds none.
    IF v_ok AND i.owed_action IS NOT NULL
       AND (i.owed_action <> v_action OR v_action IN ('update', 'restart'))
       AND i.owed_due_at IS NOT NULL
       AND (CASE WHEN v_action = 'email' THEN public.lifecycle_target_wait(i) IS NULL
                 ELSE coalesce(public.lifecycle_target_wait(i), 'target_busy') = 'target_busy' END)
       AND (CASE WHEN i.owed_action = 'email'
                 THEN i.welcome_email_next_at IS NULL OR i.welcome_email_next_at <= now()
                 WHEN i.owed_action = 'destroy_storage'
                 THEN i.storage_destroy_after <= now()
                 ELSE i.next_attempt_at IS NULL OR i.next_attempt_at <= now() END) THEN
        -- A token of its own (the same owner): a retry of this call, whose answer
        -- was lost with the connection, is never recorded as the chained step's
        -- outcome; it is given this answer again (claim_chained_from, above).
        i := public.lifecycle_take(i.id, NULL, substr(p_token, strpos(p_token, '/') + 1), p_lease_s,
                                   p_token);
        RETURN jsonb_build_object('outcome', 'claimed',
                                  'instance', public.lifecycle_instance_json(i),
                                  'step', public.lifecycle_step_json(i));
    END IF;

    IF i.claimed_by IS NOT NULL THEN
        UPDATE public.instances SET claimed_by = NULL, claim_expires_at = NULL, claim_action = NULL
         WHERE id = i.id RETURNING * INTO i;
    END IF;
    RETURN jsonb_build_object('outcome', CASE WHEN v_ok THEN 'done' ELSE 'failed' END,
                              'instance', public.lifecycle_instance_json(i));
END;
$$;

CREATE OR REPLACE FUNCTION public.tenant_instance(p_instance_id uuid)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_uid uuid := (SELECT auth.uid());
    v_id uuid;
    v jsonb;
BEGIN
    IF v_uid IS NULL THEN
        RAISE EXCEPTION 'a signed-in user''s call' USING ERRCODE = '42501';
    END IF;
    -- RLS shows a tenant its own rows only; the account test keeps that true for a
    -- caller that bypasses RLS.
    SELECT i.id INTO v_id
      FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id
     WHERE s.account_id = v_uid AND (p_instance_id IS NULL OR i.id = p_instance_id)
     ORDER BY (i.status = 'deprovisioned'), public.is_entitled(s.status) DESC, i.created_at DESC, i.id
     LIMIT 1;
    IF v_id IS NULL THEN
        RETURN NULL;
    END IF;

    SELECT jsonb_build_object(
        'instance', jsonb_build_object(
            'id', i.id, 'status', i.status, 'desired_status', i.desired_status,
            'owed_action', i.owed_action, 'owed_since', i.owed_since,
            'subdomain', i.subdomain, 'frontend_url', i.frontend_url,
            'backend_url', i.backend_url, 'matrix_server_url', i.matrix_server_url,
            'matrix_server_name', i.matrix_server_name,
            'memory_limit_mb', i.memory_limit_mb, 'cpu_limit', i.cpu_limit, 'storage_gb', i.storage_gb,
            'created_at', i.created_at, 'provisioned_at', i.provisioned_at,
            'deprovisioned_at', i.deprovisioned_at, 'storage_destroy_after', i.storage_destroy_after,
            'restart', jsonb_build_object(
                'pending', i.restart_version > i.applied_restart_version,
                'held', i.restart_version > i.applied_restart_version
                        AND coalesce('restart' = ANY (i.rejected_actions), false),
                'requested_at', i.restart_requested_at, 'restarted_at', i.restarted_at),
            -- What went wrong: the owed step while it fails (attempts counted since its
            -- last success; held for an operator while its action is rejected),
            -- whether or not the instance runs; else, for an instance that is not
            -- running, the health checks that failed it. The health checks' error
            -- while it runs is health.error.
            'error', CASE WHEN i.attempts > 0 AND coalesce(i.rejected_actions[1], i.owed_action) IS NOT NULL
                          THEN public.instance_step_error(coalesce(i.rejected_actions[1], i.owed_action),
                                                          coalesce(cardinality(i.rejected_actions), 0) > 0)
                          WHEN i.status <> 'running' THEN i.error_message END),
        -- Only a running instance is probed: another one's last result is history.
        'health', CASE WHEN i.status = 'running' THEN jsonb_build_object(
            'status', i.health_status, 'checked_at', i.last_health_check,
            'error', i.error_message, 'consecutive_failures', i.consecutive_failures)
            ELSE jsonb_build_object(
            'status', 'not_checked', 'checked_at', i.last_health_check,
            'error', NULL, 'consecutive_failures', NULL) END,
        'subscription', jsonb_build_object(
            'id', s.id, 'status', s.status, 'tier', s.tier,
            'cancel_at_period_end', s.cancel_at_period_end, 'cancelled_at', s.cancelled_at,
            'current_period_end', s.current_period_end, 'trial_ends_at', s.trial_ends_at),
        'plan', jsonb_build_object(
            'name', (SELECT p.name FROM public.plans p WHERE p.stripe_price_id = s.stripe_price_id),
            'tier', s.tier, 'max_agents', s.max_agents,
            'max_messages_per_day', s.max_messages_per_day, 'max_storage_gb', s.max_storage_gb),
        'usage', jsonb_build_object(
            'today', jsonb_build_object(
                'date', CURRENT_DATE,
                'messages_sent', coalesce(u.messages_sent, 0),
                'agents_used', coalesce(u.agents_used, '{}'::jsonb),
                'tools_used', coalesce(u.tools_used, '{}'::jsonb),
                'remaining', CASE WHEN s.max_messages_per_day IS NULL THEN NULL
                                  ELSE greatest(s.max_messages_per_day -
                                       CASE WHEN s.last_reset_at < CURRENT_DATE THEN 0
                                            ELSE coalesce(s.current_messages_today, 0) END, 0) END,
                'resets_at', (CURRENT_DATE + 1)::timestamptz),
            'last_30_days', (
                SELECT jsonb_agg(jsonb_build_object(
                           'date', d.day, 'messages_sent', coalesce(m.messages_sent, 0),
                           'agents', (SELECT count(*) FROM jsonb_object_keys(
                                          CASE WHEN jsonb_typeof(m.agents_used) = 'object'
                                               THEN m.agents_used ELSE '{}'::jsonb END)))
                           ORDER BY d.day)
                  FROM (SELECT g::date AS day FROM generate_series(CURRENT_DATE - 29, CURRENT_DATE,
                                                                   interval '1 day') g) d
                  LEFT JOIN public.usage_metrics m ON m.instance_id = i.id AND m.date = d.day)))
      INTO v
      FROM public.instances i
      JOIN public.subscriptions s ON s.id = i.subscription_id
      LEFT JOIN public.usage_metrics u ON u.instance_id = i.id AND u.date = CURRENT_DATE
     WHERE i.id = v_id;
    RETURN v;
END;
$$;

UPDATE public.instances i
   SET error_message = NULL
 WHERE i.status = 'running' AND i.attempts > 0
   AND i.error_message IN (
           public.instance_step_error(coalesce(i.rejected_actions[1], i.owed_action), true),
           public.instance_step_error(coalesce(i.rejected_actions[1], i.owed_action), false));
