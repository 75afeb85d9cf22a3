-- 132_checkout_after_subscription.sql: a checkout that finds the account's
-- subscription recorded meanwhile is refused, and a paid session is never answered
-- again.
--
-- - Step 5 of create-checkout-session (billing_checkout_older_open) answered
--   'paid' only while a paid checkout's subscription was not recorded yet: a
--   checkout that passed step 1 while another tab's session was being paid, and
--   waited at Stripe while that payment's webhook recorded the subscription, found
--   the paid session 'completed' with its subscription already there, and handed
--   out a second payable session to an account with a live subscription. 'paid' is
--   now also true when the account has such a subscription
--   (public.billing_live_status, the rule of billing_account's live_status, now
--   in one place), and a 'completed' newer attempt counts as newer.
-- - billing_attempt_begin answered a checkout attempt of the last hour again (the
--   same plan clicked twice) even when its session had been paid since: a customer
--   who cancelled and chose the same plan again within the hour got the URL of a
--   session that can no longer be paid. An attempt is answered again only while
--   no subscription of the account was recorded after it began.
--
-- Redefines, each whole from its last definition and unchanged but for the lines
-- named: public.billing_checkout_older_open (v_newer's statuses, 'paid'),
-- public.billing_attempt_begin (the subscription condition), public.billing_account
-- (v_live from billing_live_status) (127_checkout_one_payable.sql). CREATE OR
-- REPLACE keeps each function's grants.

-- The status of the account's subscription that a new checkout would duplicate (one
-- that is not over: a change goes through the portal), NULL when it has none.
CREATE FUNCTION public.billing_live_status(p_account_id uuid)
RETURNS public.subscription_status
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT s.status FROM public.subscriptions s
     WHERE s.account_id = p_account_id
       AND s.status IN ('trialing', 'active', 'past_due', 'unpaid', 'paused')
     ORDER BY s.updated_at DESC, s.id LIMIT 1;
$$;
REVOKE ALL ON FUNCTION public.billing_live_status(uuid) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.billing_live_status(uuid) TO service_role;

CREATE OR REPLACE FUNCTION public.billing_checkout_older_open(p_account_id uuid, p_session_id text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_at    timestamptz;
    v_id    uuid;
    v_newer boolean;
BEGIN
    SELECT b.created_at, b.id INTO v_at, v_id FROM public.billing_attempts b
     WHERE b.account_id = p_account_id AND b.kind = 'checkout' AND b.object_id = p_session_id;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('older', '[]'::jsonb);
    END IF;
    SELECT EXISTS (
        SELECT 1 FROM public.billing_attempts b
         WHERE b.account_id = p_account_id AND b.kind = 'checkout' AND b.status IN ('succeeded', 'completed')
           AND b.object_id IS NOT NULL AND b.object_id <> p_session_id
           AND (b.expires_at IS NULL OR b.expires_at > now())
           AND (b.created_at, b.id) > (v_at, v_id)) INTO v_newer;
    RETURN jsonb_build_object('attempt_id', v_id, 'newer', v_newer,
                              'paid', public.billing_checkout_paid_pending(p_account_id)
                                      OR public.billing_live_status(p_account_id) IS NOT NULL,
                              'older', coalesce((
        SELECT jsonb_agg(jsonb_build_object('attempt_id', b.id, 'session_id', b.object_id)
                         ORDER BY b.created_at, b.id)
          FROM public.billing_attempts b
         WHERE b.account_id = p_account_id AND b.kind = 'checkout' AND b.status = 'succeeded'
           AND b.object_id IS NOT NULL AND b.object_id <> p_session_id
           AND (b.expires_at IS NULL OR b.expires_at > now())
           AND (b.created_at, b.id) < (v_at, v_id)), '[]'::jsonb));
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
     WHERE a.id = p_account_id FOR UPDATE;
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

CREATE OR REPLACE FUNCTION public.billing_account(p_account_id text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_acc  public.accounts;
    v_live public.subscription_status;
    v_any  boolean;
BEGIN
    IF p_account_id IS NULL
       OR p_account_id !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RETURN jsonb_build_object('found', false);
    END IF;
    SELECT * INTO v_acc FROM public.accounts a WHERE a.id = p_account_id::uuid;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('found', false);
    END IF;
    v_live := public.billing_live_status(v_acc.id);
    SELECT EXISTS (SELECT 1 FROM public.subscriptions s WHERE s.account_id = v_acc.id) INTO v_any;
    RETURN jsonb_build_object('found', true, 'email', v_acc.email,
                              'customer', v_acc.stripe_customer_id,
                              'live_status', v_live, 'had_subscription', v_any,
                              'checkout_paid', public.billing_checkout_paid_pending(v_acc.id));
END;
$$;
