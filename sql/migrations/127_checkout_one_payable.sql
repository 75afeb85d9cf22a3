-- 127_checkout_one_payable.sql: of two checkouts of one account running at the same
-- time, only the newest session can be paid; a session found paid is remembered until
-- its subscription is recorded.
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
-- A session found paid (Stripe will no longer expire it) was recorded merely abandoned.
-- When the new checkout's own session could then not be expired (a Stripe 5xx, the
-- deadline), the caller got 409 checkout_completed but its own attempt stayed succeeded
-- and open, so the next click for the same plan was answered that session again (200)
-- and could pay a second time: nothing in the database said an older session was paid.
-- Such an attempt is now recorded 'completed', and while the account has one whose
-- subscription is not recorded yet, every new checkout is refused before anything is
-- sent to Stripe (409 checkout_completed). "Not recorded yet" is bounded by Stripe's
-- webhook retries: an event is retried for 3 days, and a session can be paid until its
-- expires_at, so a lost webhook blocks the account at most until 3 days after that.
--
-- billing_attempts.status: also 'completed' (its session was paid; the check constraint
-- is replaced).
-- billing_checkout_paid_pending(account) (new): true while the account has a checkout
-- attempt recorded completed, no subscription of the account was recorded since that
-- attempt was created, and its expires_at (created_at + 24 h when unknown) is less than
-- 3 days ago.
-- billing_checkout_completed(attempt, why) (new): a succeeded checkout attempt whose
-- session Stripe will no longer expire is completed; {"completed": true when this call
-- changed it, "paid": billing_checkout_paid_pending of its account afterwards}.
-- billing_checkout_abandoned(attempt, why), redefined (last in 122): also turns a
-- completed attempt abandoned. Every caller has seen the session expire (or Stripe not
-- know it), which no paid session does, while "no longer open" may also mean that a
-- concurrent checkout expired it first: the certain answer wins whichever is recorded
-- last. Differs from 122 only in the status condition.
-- billing_checkout_older_open(account, session), redefined (last in 122): also
-- "newer": true when a checkout attempt of the account created after the one that made
-- `session` succeeded and its session has not reached its expires_at, and "paid":
-- billing_checkout_paid_pending(account). Differs from 122 only in the v_newer
-- declaration, its SELECT and the 'newer' and 'paid' keys of the answer.
-- billing_account(account), redefined (last in 050): also "checkout_paid":
-- billing_checkout_paid_pending(account). Differs from 050 only in that key.
-- billing_attempt_succeeded(...), redefined (last in 050): a completed attempt is not
-- turned back into succeeded by a late answer to a resumed request. Differs from 050
-- only in the `IF v.status NOT IN ('succeeded', 'completed')` condition.
--
-- billing_attempt_begin(account, kind, fingerprint), redefined (last in 050): a checkout
-- session is answered again for a repeated request only while its attempt is the
-- account's newest checkout attempt. A tab told checkout_superseded whose user clicks
-- the same plan again now gets a new session (which supersedes the other tab's) instead
-- of the old one, refused again as superseded. Differs from 050 only in the NOT EXISTS
-- condition of the "done" branch.

ALTER TABLE public.billing_attempts DROP CONSTRAINT billing_attempts_status_check,
    ADD CONSTRAINT billing_attempts_status_check
        CHECK (status IN ('pending', 'succeeded', 'failed', 'abandoned', 'completed'));

CREATE FUNCTION public.billing_checkout_paid_pending(p_account_id uuid)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT EXISTS (
        SELECT 1 FROM public.billing_attempts b
         WHERE b.account_id = p_account_id AND b.kind = 'checkout' AND b.status = 'completed'
           AND coalesce(b.expires_at, b.created_at + interval '24 hours') > now() - interval '3 days'
           AND NOT EXISTS (SELECT 1 FROM public.subscriptions s
                            WHERE s.account_id = b.account_id AND s.created_at >= b.created_at));
$$;

CREATE FUNCTION public.billing_checkout_completed(p_attempt_id uuid, p_why text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_account uuid;
    v_changed boolean;
BEGIN
    UPDATE public.billing_attempts SET status = 'completed', error = left(p_why, 500)
     WHERE id = p_attempt_id AND kind = 'checkout' AND status = 'succeeded';
    v_changed := FOUND;
    SELECT b.account_id INTO v_account FROM public.billing_attempts b WHERE b.id = p_attempt_id;
    RETURN jsonb_build_object('completed', v_changed,
                              'paid', coalesce(public.billing_checkout_paid_pending(v_account), false));
END;
$$;

CREATE OR REPLACE FUNCTION public.billing_checkout_abandoned(p_attempt_id uuid, p_why text)
RETURNS jsonb
LANGUAGE sql VOLATILE
SET search_path = ''
AS $$
    WITH u AS (
        UPDATE public.billing_attempts SET status = 'abandoned', error = left(p_why, 500)
         WHERE id = p_attempt_id AND kind = 'checkout' AND status IN ('succeeded', 'completed')
        RETURNING 1)
    SELECT jsonb_build_object('abandoned', EXISTS (SELECT 1 FROM u));
$$;

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
    RETURN jsonb_build_object('attempt_id', v_id, 'newer', v_newer,
                              'paid', public.billing_checkout_paid_pending(p_account_id),
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
    SELECT s.status INTO v_live FROM public.subscriptions s
     WHERE s.account_id = v_acc.id
       AND s.status IN ('trialing', 'active', 'past_due', 'unpaid', 'paused')
     ORDER BY s.updated_at DESC, s.id LIMIT 1;
    SELECT EXISTS (SELECT 1 FROM public.subscriptions s WHERE s.account_id = v_acc.id) INTO v_any;
    RETURN jsonb_build_object('found', true, 'email', v_acc.email,
                              'customer', v_acc.stripe_customer_id,
                              'live_status', v_live, 'had_subscription', v_any,
                              'checkout_paid', public.billing_checkout_paid_pending(v_acc.id));
END;
$$;

CREATE OR REPLACE FUNCTION public.billing_attempt_succeeded(p_attempt_id uuid, p_object_id text, p_url text,
                                                            p_expires_at bigint, p_livemode boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v      public.billing_attempts;
    v_cust text;
    v_note text;
BEGIN
    SELECT * INTO v FROM public.billing_attempts b WHERE b.id = p_attempt_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown attempt' USING ERRCODE = 'P0002';
    END IF;
    IF v.kind = 'customer' THEN
        UPDATE public.accounts SET stripe_customer_id = p_object_id
         WHERE id = v.account_id AND stripe_customer_id IS NULL;
        SELECT a.stripe_customer_id INTO v_cust FROM public.accounts a WHERE a.id = v.account_id;
        IF v_cust IS DISTINCT FROM p_object_id THEN
            v_note := 'account already linked to another customer; this one is unused';
        END IF;
    END IF;
    IF v.status NOT IN ('succeeded', 'completed') THEN
        UPDATE public.billing_attempts SET
            status     = 'succeeded',
            object_id  = p_object_id,
            url        = p_url,
            expires_at = pg_catalog.to_timestamp(p_expires_at),
            livemode   = p_livemode,
            error      = v_note
        WHERE id = v.id;
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (v.account_id, 'billing.' || v.kind || '_created',
                jsonb_build_object('attempt_id', v.id, 'object_id', p_object_id,
                                   'livemode', p_livemode));
    END IF;
    RETURN jsonb_build_object('object_id', coalesce(v_cust, p_object_id), 'url', p_url,
                              'expires_at', p_expires_at);
END;
$$;

DO $grants$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'public.billing_checkout_paid_pending(uuid)',
        'public.billing_checkout_completed(uuid, text)',
        'public.billing_checkout_abandoned(uuid, text)',
        'public.billing_checkout_older_open(uuid, text)',
        'public.billing_account(text)',
        'public.billing_attempt_begin(uuid, text, text)',
        'public.billing_attempt_succeeded(uuid, text, text, bigint, boolean)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
    END LOOP;
END
$grants$;
