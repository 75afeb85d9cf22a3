-- 188_welcome_email_rejection_held.sql: a welcome email Resend refuses for good is
-- held, not sent again every backoff.
--
-- A refusal (a 4xx other than a rate limit, a key error or an idempotent request
-- still in progress: an address Resend will not send to, an unverified sending
-- domain) was retried with the transient failures' backoff, hourly at its cap, for
-- as long as the instance lived, each time refused again.
--
-- - lifecycle_finish records a refused email as held: welcome_email_error
--   'rejected: ...' (Resend's own words) and welcome_email_next_at 'infinity'.
-- - instances_work_owed: an email so held is not due (owed_due_at NULL, which
--   mindroomctl stuck shows as "held"), as a rejected step's action is.
-- - An operator who fixed the cause lifts it with mindroomctl provision (provision's
--   update sets a welcome_email_next_at past now to now), unchanged.
--
-- Redefines, each unchanged but for the lines named: public.lifecycle_finish
-- (172_step_error_shown.sql: the failed email's welcome_email_next_at) and
-- public.instances_work_owed (164_restart_past_rejected_update.sql: v_held).

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
                   -- Refused for good: held until an operator lifts it (provision).
                   welcome_email_next_at = CASE WHEN coalesce((v_email->>'rejected')::boolean, false)
                       THEN 'infinity'::timestamptz
                       ELSE now() + make_interval(secs => coalesce(
                       (v_email->>'retry_in_s')::double precision,
                       least(p_backoff_cap_s::double precision,
                             p_backoff_base_s * power(2, least(welcome_email_attempts, 30))))) END
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

CREATE OR REPLACE FUNCTION public.instances_work_owed()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    v_action public.lifecycle_action;
    v_held boolean;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.config_version = OLD.config_version
       AND (NEW.memory_limit_mb IS DISTINCT FROM OLD.memory_limit_mb
            OR NEW.cpu_limit IS DISTINCT FROM OLD.cpu_limit
            OR NEW.homeserver_memory_mb IS DISTINCT FROM OLD.homeserver_memory_mb
            OR NEW.homeserver_cpu IS DISTINCT FROM OLD.homeserver_cpu
            OR NEW.storage_gb IS DISTINCT FROM OLD.storage_gb
            OR NEW.subdomain IS DISTINCT FROM OLD.subdomain
            OR (NEW.environment_vars IS DISTINCT FROM OLD.environment_vars
                AND NEW.environment_vars IS DISTINCT FROM '{}'::jsonb)) THEN
        NEW.config_version := OLD.config_version + 1;
    END IF;

    -- The actions the provisioner rejected, while the hold stands (a 4xx:
    -- last_error 'rejected: ...', no next_attempt_at): lifecycle_finish recording a
    -- step's rejection (its attempts counted under its lease) adds the step's action.
    IF NEW.next_attempt_at IS NOT NULL OR NEW.last_error IS NULL
       OR NEW.last_error NOT LIKE 'rejected: %' THEN
        NEW.rejected_actions := NULL;
    ELSIF TG_OP = 'UPDATE' AND NEW.claim_action IS NOT NULL AND NEW.attempts > OLD.attempts
          AND NOT coalesce(NEW.claim_action = ANY (OLD.rejected_actions), false) THEN
        NEW.rejected_actions := array_append(OLD.rejected_actions, NEW.claim_action);
    END IF;

    v_action := public.lifecycle_owed_action(NEW);
    NEW.owed_action := v_action;
    IF v_action IS NULL THEN
        NEW.owed_since := NULL;
        NEW.owed_due_at := NULL;
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' OR OLD.owed_action IS DISTINCT FROM v_action OR OLD.owed_since IS NULL THEN
        NEW.owed_since := now();
    END IF;
    -- A rejected step holds the action it rejected, not another one (a restart, a
    -- cancellation's destroy, an unpaid subscription's stop, whenever it became owed).
    -- So does a welcome email Resend refused (lifecycle_finish: 'infinity').
    v_held := coalesce(v_action = ANY (NEW.rejected_actions), false)
              OR (v_action = 'email' AND NEW.welcome_email_next_at = 'infinity');
    NEW.owed_due_at := CASE WHEN v_held THEN NULL ELSE
        greatest(NEW.owed_since,
                 CASE WHEN v_action = 'email' THEN NEW.welcome_email_next_at ELSE NEW.next_attempt_at END,
                 CASE WHEN v_action = 'destroy_storage' THEN NEW.storage_destroy_after END,
                 CASE WHEN NEW.claimed_by IS NOT NULL THEN NEW.claim_expires_at END) END;

    IF NEW.owed_due_at <= now()
       AND (TG_OP = 'INSERT' OR OLD.owed_due_at IS NULL OR OLD.owed_due_at > now()) THEN
        IF current_setting('mindroom.wake_after_commit', true) = 'on' THEN
            PERFORM pg_catalog.set_config('mindroom.wake', 'on', true);
        ELSE
            PERFORM public.lifecycle_wake();
        END IF;
    END IF;
    RETURN NEW;
END;
$$;
