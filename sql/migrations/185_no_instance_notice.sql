-- 185_no_instance_notice.sql: my-instance's 404 says why a customer has no instance
-- when its first payment explains it.
--
-- A customer who paid through Checkout by bank debit has an `incomplete`
-- subscription and no instance until the debit clears, days later (183); my-instance
-- answered 404 "you have no instance" with nothing saying the payment is under way
-- and the instance will come. One whose first payment was given up
-- (`incomplete_expired`) got the same words.
--
-- - public.tenant_instance_notice: with no instance (p_status NULL), the notice of
--   the subscription that has none: `payment_processing` while it is `incomplete`,
--   `payment_not_completed` once `incomplete_expired`, NULL otherwise. The words stay
--   in this one function.
-- - public.tenant_no_instance_notice(): that notice for the caller, from its
--   subscriptions without an instance (one still processing first, else the newest),
--   or NULL. Runs as the caller (RLS: its own rows). my-instance asks it only for its
--   404 without instance_id and adds it to the answer.
--
-- Redefines public.tenant_instance_notice (184_tenant_notice.sql) whole, unchanged
-- but for the first branch; CREATE OR REPLACE keeps its grants.

CREATE OR REPLACE FUNCTION public.tenant_instance_notice(
    p_status public.instance_status, p_desired public.instance_status,
    p_provisioned_at timestamptz, p_held boolean, p_owed public.lifecycle_action,
    p_storage_destroy_after timestamptz, p_storage_destroyed_at timestamptz,
    p_sub_status public.subscription_status, p_cancel_at_period_end boolean,
    p_period_end timestamptz, p_trial_ends_at timestamptz)
RETURNS jsonb
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = ''
AS $$
DECLARE
    v_code text;
    v_msg text;
    v_is text := CASE WHEN p_status = 'stopped' THEN 'is stopped' ELSE 'is being stopped' END;
BEGIN
    IF p_status IS NULL THEN
        -- No instance (tenant_no_instance_notice): only a first payment that has not
        -- gone through explains that.
        IF p_sub_status = 'incomplete' THEN
            v_code := 'payment_processing';
            v_msg := 'Your first payment is still processing (a bank debit takes a few days to clear): '
                     || 'your instance is created as soon as it clears.';
        ELSIF p_sub_status = 'incomplete_expired' THEN
            v_code := 'payment_not_completed';
            v_msg := 'Your first payment did not complete, so no instance was created: '
                     || 'subscribe again to get one.';
        END IF;
    ELSIF p_status = 'deprovisioned' THEN
        IF p_storage_destroyed_at IS NOT NULL THEN
            v_code := 'data_deleted';
            v_msg := 'This instance was removed and its data deleted.';
        ELSIF p_owed = 'destroy_storage' AND p_storage_destroy_after > now() THEN
            -- Kept for the account: a new subscription's instance takes it back (186).
            v_code := 'data_kept';
            v_msg := 'This instance was removed. Its data is kept until '
                     || to_char(p_storage_destroy_after AT TIME ZONE 'UTC', 'YYYY-MM-DD')
                     || ' (UTC): subscribe again before then and your new instance gets it back.';
        ELSE
            v_code := 'removed';
            v_msg := 'This instance was removed.';
        END IF;
    ELSIF p_status = 'deprovisioning' OR p_desired = 'deprovisioned' THEN
        v_code := 'being_removed';
        v_msg := CASE WHEN p_sub_status IN ('cancelled', 'incomplete_expired')
                      THEN 'Your subscription has ended: your instance is being removed. Its data is kept for a while after.'
                      ELSE 'Your instance is being removed.' END;
    ELSIF p_desired = 'stopped' THEN
        IF p_sub_status = 'unpaid' THEN
            v_code := 'unpaid';
            v_msg := 'Your instance ' || v_is || ': your subscription is unpaid. '
                     || 'Update your payment method and it starts again, with its data.';
        ELSIF p_sub_status = 'paused' THEN
            v_code := 'paused';
            v_msg := 'Your instance ' || v_is || ': your subscription is paused. '
                     || 'Resume it and your instance starts again, with its data.';
        ELSIF public.is_entitled(p_sub_status) THEN
            -- Billing wants an entitled subscription's instance running: this stop is
            -- an operator's, and only an operator ends it.
            v_code := 'stopped_by_operator';
            v_msg := 'Your instance ' || v_is || ' by MindRoom''s operators: '
                     || 'contact support to have it started again. Its data is kept.';
        ELSE
            v_code := 'stopped';
            v_msg := 'Your instance ' || v_is || '.';
        END IF;
    ELSIF p_status = 'provisioning' AND p_provisioned_at IS NULL THEN
        v_code := 'being_created';
        v_msg := 'Your instance is being created: this takes a few minutes.';
    ELSIF p_status IN ('provisioning', 'stopped') THEN
        v_code := 'starting';
        v_msg := 'Your instance is starting.';
    ELSIF p_status = 'failed' THEN
        v_code := 'failed';
        v_msg := CASE WHEN p_held THEN 'Your instance is not running: it waits for MindRoom''s operators.'
                      ELSE 'Your instance is not running: it is set up again automatically.' END;
    ELSIF p_sub_status = 'past_due' THEN
        v_code := 'payment_failed';
        v_msg := 'Your last payment failed: update your payment method to keep your instance running.';
    ELSIF p_cancel_at_period_end THEN
        v_code := 'ends_at_period_end';
        v_msg := 'Your subscription ends '
                 || coalesce('on ' || to_char(p_period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ' (UTC)',
                             'at the end of its period')
                 || ': your instance runs until then.';
    ELSIF p_sub_status = 'trialing' AND p_trial_ends_at IS NOT NULL THEN
        v_code := 'trial';
        v_msg := 'Your trial ends on '
                 || to_char(p_trial_ends_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ' (UTC).';
    END IF;
    RETURN CASE WHEN v_code IS NOT NULL
                THEN jsonb_build_object('code', v_code, 'message', v_msg) END;
END;
$$;

CREATE FUNCTION public.tenant_no_instance_notice()
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_uid uuid := (SELECT auth.uid());
    v_status public.subscription_status;
BEGIN
    IF v_uid IS NULL THEN
        RAISE EXCEPTION 'a signed-in user''s call' USING ERRCODE = '42501';
    END IF;
    -- The account test keeps RLS's answer for a caller that bypasses RLS.
    SELECT s.status INTO v_status
      FROM public.subscriptions s
     WHERE s.account_id = v_uid
       AND NOT EXISTS (SELECT 1 FROM public.instances i WHERE i.subscription_id = s.id)
     ORDER BY (s.status = 'incomplete') DESC, s.created_at DESC, s.id
     LIMIT 1;
    RETURN public.tenant_instance_notice(NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                                         v_status, NULL, NULL, NULL);
END;
$$;

REVOKE ALL ON FUNCTION public.tenant_no_instance_notice() FROM PUBLIC, anon;
GRANT EXECUTE ON FUNCTION public.tenant_no_instance_notice() TO authenticated, service_role;
