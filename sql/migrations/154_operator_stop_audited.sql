-- 154_operator_stop_audited.sql: an operator's stop, and the provision that ends it,
-- are audited.
--
-- The stop that holds an instance against billing (138_operator_stop.sql,
-- instances.operator_stopped_at) wrote no audit row, nor did the provision that
-- ends the hold, while an operator's purge, a token rotation and a tenant's restart
-- each write one: who suspended an instance, and who resumed it, was nowhere. Now:
-- - instance.stop_requested {instance_id, app, by}: lifecycle_deprovision, when its
--   stop sets operator_stopped_at (a stop of an instance already held writes nothing);
-- - instance.resume_requested {instance_id, app, by, stopped_at}: lifecycle_provision,
--   when it records the resume of a held instance (stopped_at: when the hold began).
-- "by" is the request's JWT role, as instance.purge_requested's.
--
-- Redefines, each whole from 138_operator_stop.sql and unchanged but for the lines
-- named (CREATE OR REPLACE, so their grants stay):
-- - public.lifecycle_deprovision: the INSERT after the UPDATE that sets
--   operator_stopped_at;
-- - public.lifecycle_provision: v_held (the hold as the row had it before), and
--   the INSERT after the UPDATE when it ended one.

CREATE OR REPLACE FUNCTION public.lifecycle_deprovision(p_instance_id uuid, p_subscription_id uuid,
                                             p_mode text, p_purge boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    i public.instances;
    v_sub_status public.subscription_status;
    v_id uuid := p_instance_id;
    v_mode text := p_mode;
BEGIN
    IF p_mode IS NOT NULL AND p_mode NOT IN ('stop', 'destroy') THEN
        RAISE EXCEPTION 'mode must be stop or destroy' USING ERRCODE = '22023';
    END IF;
    IF p_purge AND p_mode IS DISTINCT FROM 'destroy' THEN
        RAISE EXCEPTION 'purge goes with mode destroy' USING ERRCODE = '22023';
    END IF;
    IF v_id IS NULL THEN
        PERFORM 1 FROM public.subscriptions WHERE id = p_subscription_id;
        IF NOT FOUND THEN
            RETURN jsonb_build_object('outcome', 'not_found');
        END IF;
        v_id := coalesce(public.lifecycle_live_instance_id(p_subscription_id),
                         (SELECT id FROM public.instances WHERE subscription_id = p_subscription_id
                           ORDER BY created_at DESC LIMIT 1));
        IF v_id IS NULL THEN
            RETURN jsonb_build_object('outcome', 'none', 'mode', coalesce(v_mode, 'stop'));
        END IF;
    END IF;

    SELECT * INTO i FROM public.instances WHERE id = v_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'not_found');
    END IF;
    IF v_mode IS NULL THEN
        SELECT status INTO v_sub_status FROM public.subscriptions WHERE id = i.subscription_id;
        v_mode := CASE WHEN public.instance_desired_for(v_sub_status) = 'deprovisioned'
                       THEN 'destroy' ELSE 'stop' END;
    END IF;
    i := public.instance_request(v_id, CASE v_mode WHEN 'destroy' THEN 'deprovisioned'::public.instance_status
                                                   ELSE 'stopped'::public.instance_status END);
    -- The operator's stop holds: until lifecycle_provision, no billing event resumes it.
    IF v_mode = 'stop' AND i.desired_status = 'stopped' AND i.operator_stopped_at IS NULL THEN
        UPDATE public.instances SET operator_stopped_at = now() WHERE id = v_id RETURNING * INTO i;
        INSERT INTO public.audit_logs (account_id, action, details)
        SELECT s.account_id, 'instance.stop_requested',
               jsonb_build_object('instance_id', i.id, 'app', i.dokku_app_name,
                                  'by', coalesce(current_setting('request.jwt.claims', true), '{}')::jsonb ->> 'role')
          FROM public.subscriptions s WHERE s.id = i.subscription_id;
    END IF;
    IF p_purge AND NOT i.purge_requested AND i.storage_destroyed_at IS NULL
       AND i.storage_taken_by IS NULL THEN
        UPDATE public.instances SET purge_requested = true,
               storage_destroy_after = CASE WHEN status = 'deprovisioned' THEN now()
                                            ELSE storage_destroy_after END
         WHERE id = v_id RETURNING * INTO i;
        INSERT INTO public.audit_logs (account_id, action, details)
        SELECT s.account_id, 'instance.purge_requested',
               jsonb_build_object('instance_id', i.id, 'app', i.dokku_app_name,
                                  'by', coalesce(current_setting('request.jwt.claims', true), '{}')::jsonb ->> 'role')
          FROM public.subscriptions s WHERE s.id = i.subscription_id;
    END IF;
    -- An explicit request lifts a retry backoff or an operator hold on what it asks for.
    IF i.owed_action IN ('stop', 'destroy', 'destroy_storage')
       AND (i.next_attempt_at > now() OR (i.next_attempt_at IS NULL AND i.last_error IS NOT NULL)) THEN
        UPDATE public.instances SET next_attempt_at = now() WHERE id = v_id RETURNING * INTO i;
    END IF;
    RETURN jsonb_build_object('outcome', 'ok', 'mode', v_mode, 'purge', i.purge_requested,
                              'instance', public.lifecycle_instance_json(i))
        || CASE WHEN p_purge AND i.storage_taken_by IS NOT NULL
                THEN jsonb_build_object('storage_taken_by', i.storage_taken_by)
                ELSE '{}'::jsonb END;
END;
$$;

CREATE OR REPLACE FUNCTION public.lifecycle_provision(p_subscription_id uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    s public.subscriptions;
    i public.instances;
    v_id uuid;
    v_mem integer;
    v_cpu numeric;
    v_held timestamptz;
BEGIN
    -- Serializes every request for this subscription (and the webhook's own writes
    -- to it) for the few statements below.
    SELECT * INTO s FROM public.subscriptions WHERE id = p_subscription_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'not_found');
    END IF;
    IF NOT public.is_entitled(s.status) THEN
        RETURN jsonb_build_object('outcome', 'not_entitled', 'subscription_status', s.status,
            'instance', (SELECT public.lifecycle_instance_json(x) FROM public.instances x
                          WHERE x.id = public.lifecycle_live_instance_id(p_subscription_id)));
    END IF;

    -- The same plan the tier -> limits triggers (004) use.
    SELECT p.memory_limit_mb, p.cpu_limit INTO v_mem, v_cpu
      FROM public.plan_for(s.tier, s.stripe_price_id) p;

    v_id := public.lifecycle_live_instance_id(p_subscription_id);
    IF v_id IS NULL THEN
        BEGIN
            INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status,
                                          desired_status)
            SELECT p_subscription_id, n.dokku_app_name, n.subdomain, 'provisioning', 'running'
              FROM public.instance_names(p_subscription_id) n
            RETURNING id INTO v_id;
        EXCEPTION WHEN unique_violation THEN
            -- A destroyed instance of this subscription still holds the names.
            RETURN jsonb_build_object('outcome', 'conflict',
                'message', 'the instance names of this subscription are still taken');
        END;
    END IF;

    SELECT * INTO i FROM public.instances WHERE id = v_id FOR UPDATE;
    IF i.status = 'deprovisioning' OR i.desired_status = 'deprovisioned' THEN
        RETURN jsonb_build_object('outcome', 'conflict',
            'message', 'the instance is being destroyed',
            'instance', public.lifecycle_instance_json(i));
    END IF;

    v_held := i.operator_stopped_at;
    UPDATE public.instances SET
        desired_status = 'running',
        operator_stopped_at = NULL,
        memory_limit_mb = coalesce(v_mem, memory_limit_mb),
        cpu_limit = coalesce(v_cpu, cpu_limit),
        next_attempt_at = CASE WHEN next_attempt_at > now()
                                 OR (next_attempt_at IS NULL AND last_error IS NOT NULL)
                               THEN now() ELSE next_attempt_at END,
        welcome_email_next_at = CASE WHEN welcome_email_next_at > now() THEN now()
                                     ELSE welcome_email_next_at END
     WHERE id = v_id
       AND (desired_status IS DISTINCT FROM 'running'
            OR operator_stopped_at IS NOT NULL
            OR memory_limit_mb IS DISTINCT FROM coalesce(v_mem, memory_limit_mb)
            OR cpu_limit IS DISTINCT FROM coalesce(v_cpu, cpu_limit)
            OR next_attempt_at > now() OR (next_attempt_at IS NULL AND last_error IS NOT NULL)
            OR welcome_email_next_at > now())
    RETURNING * INTO i;
    IF NOT FOUND THEN
        SELECT * INTO i FROM public.instances WHERE id = v_id;
    ELSIF v_held IS NOT NULL THEN
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (s.account_id, 'instance.resume_requested',
                jsonb_build_object('instance_id', i.id, 'app', i.dokku_app_name,
                                   'by', coalesce(current_setting('request.jwt.claims', true), '{}')::jsonb ->> 'role',
                                   'stopped_at', v_held));
    END IF;
    RETURN jsonb_build_object('outcome', 'ok', 'instance', public.lifecycle_instance_json(i));
END;
$$;
