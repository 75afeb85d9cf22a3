-- 211_pending_customer_past_resume.sql: a customer attempt pending past its resume is
-- looked for at Stripe before another one is made.
--
-- A customer attempt whose outcome we never learnt (no answer, a 5xx not replayed)
-- stays pending, and the same request resumes it with the same key, so Stripe replays
-- the customer it made, for 23 hours (billing_attempt_begin; Stripe keeps a key 24).
-- billing_customer_emails, which says whether to list Stripe's customers before a new
-- customer attempt, counted a pending attempt of the same email as sure to be resumed,
-- whatever its age. A user whose first checkout lost Stripe's answer and who came back
-- a day later got a second Stripe customer: billing_attempt_begin abandoned the old
-- attempt and sent a new key, and nothing had looked for the customer made behind the
-- first (the customer Stripe made, with the account in its metadata, left unused).
--
-- - public.billing_attempt_resume_window(kind) (new): how long a pending attempt is
--   resumed, the one rule billing_attempt_begin and billing_customer_emails read;
-- - public.billing_customer_emails: a pending attempt is unsure also once it is within
--   an hour of the end of that window. The hour keeps the checkout's look-up and its
--   billing_attempt_begin, a transaction apart, on the same side: an attempt that may
--   be given up is looked for, and one looked for and then resumed is harmless (the
--   look-up finds its customer, or the key replays it).
--
-- Redefines, each whole and unchanged but for the lines named:
-- public.billing_attempt_begin(uuid, text, text) (203_reused_checkout_read.sql: its
-- window is the new function's) and public.billing_customer_emails
-- (175_customer_emails.sql: the pending attempt's age). CREATE OR REPLACE keeps their
-- grants.

CREATE FUNCTION public.billing_attempt_resume_window(p_kind text)
RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
    -- A portal link lives minutes; a checkout's and a customer's key within Stripe's 24 hours.
    SELECT CASE p_kind WHEN 'portal' THEN interval '1 minute' ELSE interval '23 hours' END
$$;
REVOKE ALL ON FUNCTION public.billing_attempt_resume_window(text) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.billing_attempt_resume_window(text) TO service_role;

CREATE OR REPLACE FUNCTION public.billing_attempt_begin(p_account_id uuid, p_kind text, p_fingerprint text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_cust   text;
    v        public.billing_attempts;
    v_window interval := public.billing_attempt_resume_window(p_kind);
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
                                      'expires_at', extract(epoch FROM v.expires_at)::bigint,
                                      'attempt_id', v.id);
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

CREATE OR REPLACE FUNCTION public.billing_customer_emails(p_account_id uuid, p_email text)
RETURNS text[]
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    WITH unsure AS (
        SELECT b.email, b.created_at AS at
          FROM public.billing_attempts b
         WHERE b.account_id = p_account_id AND b.kind = 'customer'
           AND (b.status IN ('failed', 'abandoned')
                -- Pending, and not to be resumed: another email, or given up by the
                -- next request soon if not already.
                OR (b.status = 'pending'
                    AND ((b.email IS NOT NULL AND b.email IS DISTINCT FROM p_email)
                         OR b.created_at <= now() - public.billing_attempt_resume_window('customer')
                                                  + interval '1 hour'))))
    SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM unsure) THEN '{}'::text[] ELSE ARRAY(
        SELECT e.email
          FROM (SELECT p_email AS email, 'infinity'::timestamptz AS at
                UNION ALL SELECT u.email, u.at FROM unsure u) e
         WHERE e.email IS NOT NULL AND e.email <> ''
         GROUP BY e.email
         ORDER BY max(e.at) DESC, e.email
         LIMIT 5) END
$$;
