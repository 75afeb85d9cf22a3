-- 127_checkout_one_payable.sql: of two checkouts of one account running at the same
-- time, only the newest session can be paid.
--
-- Step 5 of create-checkout-session (122_checkout_supersedes.sql) expires the account's
-- OLDER sessions once a new one exists. Two checkouts running at the same time (two
-- tabs) escaped it: request A starts its attempt, request B starts its own (which marks
-- A's pending attempt abandoned), creates and records its session and runs step 5 before
-- A's session exists; A's answer from Stripe then records A's attempt succeeded again,
-- and A's step 5 looked only at older attempts, so it never saw B. Both sessions stayed
-- open and paying both made two subscriptions on one account. Step 5 now also asks
-- whether a NEWER checkout of the account has an open session; if so the request takes
-- its own session back (expires it at Stripe, records its attempt abandoned) and answers
-- 409 checkout_superseded. Attempts are ordered by (created_at, id), so of any two the
-- older always gives way and the newer never does.
--
-- billing_checkout_older_open(account, session), redefined (last in 122): also
-- "newer": true when a checkout attempt of the account created after the one that made
-- `session` succeeded and its session has not reached its expires_at. Differs from 122
-- only in the v_newer declaration, its SELECT and the 'newer' key of the answer.
--
-- billing_attempt_begin(account, kind, fingerprint), redefined (last in 050): a checkout
-- session is answered again for a repeated request only while its attempt is the
-- account's newest checkout attempt. A tab told checkout_superseded whose user clicks
-- the same plan again now gets a new session (which supersedes the other tab's) instead
-- of the old one, refused again as superseded. Differs from 050 only in the NOT EXISTS
-- condition of the "done" branch.

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
         WHERE b.account_id = p_account_id AND b.kind = 'checkout' AND b.status = 'succeeded'
           AND b.object_id IS NOT NULL AND b.object_id <> p_session_id
           AND (b.expires_at IS NULL OR b.expires_at > now())
           AND (b.created_at, b.id) > (v_at, v_id)) INTO v_newer;
    RETURN jsonb_build_object('attempt_id', v_id, 'newer', v_newer, 'older', coalesce((
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
                              AND (n.created_at, n.id) > (v.created_at, v.id)) THEN
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

DO $grants$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'public.billing_checkout_older_open(uuid, text)',
        'public.billing_attempt_begin(uuid, text, text)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
    END LOOP;
END
$grants$;
