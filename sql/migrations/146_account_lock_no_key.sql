-- 146_account_lock_no_key.sql: a tenant's restart, or a checkout, no longer
-- deadlocks with a transaction that writes an audit row for the same account.
--
-- tenant_instance_restart and billing_attempt_begin serialize an account's requests
-- by locking its accounts row, and took that lock FOR UPDATE. FOR UPDATE also
-- blocks every insert of a row that references the account (its foreign key takes
-- FOR KEY SHARE on accounts): audit_logs above all. A transaction that holds a row
-- these functions lock next and then writes such a row waited for them while they
-- waited for it:
-- - the lifecycle worker holds an instance row (lifecycle_finish, a status change)
--   and writes the account's audit row, while tenant_instance_restart holds the
--   account and waits for that instance row;
-- - billing_attempt_succeeded holds a pending checkout attempt and writes
--   billing.checkout_created, while billing_attempt_begin of another checkout of the
--   account holds the account and waits to mark that attempt abandoned.
-- PostgreSQL broke the cycle by failing one of them (deadlock detected) after a
-- second. Both now lock the account FOR NO KEY UPDATE: still one request of an
-- account at a time (the mode conflicts with itself, and with FOR UPDATE of a
-- change to stripe_customer_id), but no longer in the way of rows that only
-- reference it. stripe_account_for keeps FOR UPDATE: it locks the account to set
-- its stripe_customer_id, a key, which takes FOR UPDATE anyway.
--
-- Redefines public.tenant_instance_restart (070_tenant.sql) and
-- public.billing_attempt_begin (132_checkout_after_subscription.sql), each whole
-- from its last definition and unchanged but for the lock. CREATE OR REPLACE keeps
-- their grants.

CREATE OR REPLACE FUNCTION public.tenant_instance_restart(p_instance_id uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    c_max constant integer := 3;
    c_window constant interval := '10 minutes';
    v_uid uuid := (SELECT auth.uid());
    v_id uuid;
    i public.instances;
    v_recent integer;
    v_oldest timestamptz;
BEGIN
    IF v_uid IS NULL THEN
        RAISE EXCEPTION 'a signed-in user''s call' USING ERRCODE = '42501';
    END IF;
    -- One request of an account at a time: the count below cannot race. NO KEY: rows
    -- that only reference the account (the worker's audit rows) are not in its way.
    PERFORM 1 FROM public.accounts a WHERE a.id = v_uid FOR NO KEY UPDATE;
    SELECT x.id INTO v_id
      FROM public.instances x JOIN public.subscriptions s ON s.id = x.subscription_id
     WHERE s.account_id = v_uid AND (p_instance_id IS NULL OR x.id = p_instance_id)
     ORDER BY (x.status = 'deprovisioned'), public.is_entitled(s.status) DESC, x.created_at DESC, x.id
     LIMIT 1;
    IF v_id IS NULL THEN
        RETURN jsonb_build_object('outcome', 'not_found');
    END IF;
    SELECT * INTO i FROM public.instances x WHERE x.id = v_id FOR UPDATE;
    IF i.status <> 'running' OR i.desired_status <> 'running' THEN
        RETURN jsonb_build_object('outcome', 'not_running', 'status', i.status,
                                  'desired_status', i.desired_status);
    END IF;
    IF i.restart_version > i.applied_restart_version THEN
        RETURN jsonb_build_object('outcome', 'pending', 'my_instance', public.tenant_instance(v_id));
    END IF;
    SELECT count(*)::integer, min(a.created_at) INTO v_recent, v_oldest
      FROM public.audit_logs a
     WHERE a.account_id = v_uid AND a.action = 'instance.restart_requested'
       AND a.created_at > now() - c_window;
    IF v_recent >= c_max THEN
        RETURN jsonb_build_object('outcome', 'rate_limited', 'limit', c_max,
                                  'window_s', extract(epoch FROM c_window)::integer,
                                  'retry_after_s',
                                  greatest(1, ceil(extract(epoch FROM v_oldest + c_window - now())))::integer);
    END IF;
    UPDATE public.instances SET restart_version = restart_version + 1, restart_requested_at = now()
     WHERE id = v_id RETURNING * INTO i;
    INSERT INTO public.audit_logs (account_id, action, details)
    VALUES (v_uid, 'instance.restart_requested',
            jsonb_build_object('instance_id', i.id, 'restart_version', i.restart_version));
    RETURN jsonb_build_object('outcome', 'ok', 'my_instance', public.tenant_instance(v_id));
END;
$$;

CREATE OR REPLACE FUNCTION public.billing_attempt_begin(p_account_id uuid, p_kind text, p_fingerprint text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_cust   text;
    v        public.billing_attempts;
    v_window interval := CASE p_kind WHEN 'portal' THEN interval '1 minute'
                                     ELSE interval '23 hours' END;
BEGIN
    SELECT a.stripe_customer_id INTO v_cust FROM public.accounts a
     WHERE a.id = p_account_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown account' USING ERRCODE = 'P0002';
    END IF;
    IF p_kind = 'customer' AND v_cust IS NOT NULL THEN
        RETURN jsonb_build_object('state', 'done', 'object_id', v_cust, 'url', NULL,
                                  'expires_at', NULL);
    END IF;

    SELECT * INTO v FROM public.billing_attempts b
     WHERE b.account_id = p_account_id AND b.kind = p_kind AND b.fingerprint = p_fingerprint
     ORDER BY b.created_at DESC, b.id LIMIT 1;
    IF FOUND THEN
        IF v.status = 'succeeded' AND p_kind = 'checkout'
           AND v.created_at > now() - interval '1 hour'
           AND v.expires_at > now() + interval '10 minutes'
           AND NOT EXISTS (SELECT 1 FROM public.billing_attempts n
                            WHERE n.account_id = p_account_id AND n.kind = 'checkout'
                              AND (n.created_at, n.id) > (v.created_at, v.id))
           AND NOT EXISTS (SELECT 1 FROM public.subscriptions s
                            WHERE s.account_id = p_account_id AND s.created_at >= v.created_at) THEN
            RETURN jsonb_build_object('state', 'done', 'object_id', v.object_id, 'url', v.url,
                                      'expires_at', extract(epoch FROM v.expires_at)::bigint);
        END IF;
        IF v.status = 'pending' AND v.created_at > now() - v_window THEN
            UPDATE public.billing_attempts SET calls = calls + 1 WHERE id = v.id;
            RETURN jsonb_build_object('state', 'send', 'attempt_id', v.id,
                                      'idempotency_key', v.idempotency_key, 'resumed', true);
        END IF;
    END IF;

    UPDATE public.billing_attempts SET status = 'abandoned'
     WHERE account_id = p_account_id AND kind = p_kind AND status = 'pending';
    INSERT INTO public.billing_attempts (account_id, kind, idempotency_key, fingerprint)
    VALUES (p_account_id, p_kind, 'mindroom-' || p_kind || '-' || gen_random_uuid(), p_fingerprint)
    RETURNING * INTO v;
    RETURN jsonb_build_object('state', 'send', 'attempt_id', v.id,
                              'idempotency_key', v.idempotency_key, 'resumed', false);
END;
$$;
