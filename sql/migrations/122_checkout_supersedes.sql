-- 122_checkout_supersedes.sql: only an account's newest checkout session can be paid.
--
-- create-checkout-session refuses an account that has a live subscription, but a
-- session it created earlier (another plan or interval, the same one more than an
-- hour before, or a request running at the same time) stayed open at Stripe for
-- its 24 hours: paying two of them made two subscriptions on one account, each
-- with its instance and, for a new customer, its trial. Once a new session exists,
-- the function now expires the account's older ones that may still be open
-- (POST /v1/checkout/sessions/{id}/expire) and records each as abandoned, so it is
-- never handed out again. An older session that can no longer be expired was paid:
-- the new one is expired in turn and the caller told that a subscription is on its
-- way.
--
-- billing_checkout_older_open(account, session): the account's checkout attempts
-- that succeeded before the one that made `session` and whose session has not
-- reached its expires_at, oldest first, and the one that made `session`:
-- {"attempt_id", "older": [{"attempt_id", "session_id"}]}.
-- billing_checkout_abandoned(attempt, why): such an attempt is abandoned (its
-- session expired, or no longer open because it was paid); idempotent:
-- {"abandoned": true} when this call changed it.

CREATE FUNCTION public.billing_checkout_older_open(p_account_id uuid, p_session_id text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_at timestamptz;
    v_id uuid;
BEGIN
    SELECT b.created_at, b.id INTO v_at, v_id FROM public.billing_attempts b
     WHERE b.account_id = p_account_id AND b.kind = 'checkout' AND b.object_id = p_session_id;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('older', '[]'::jsonb);
    END IF;
    RETURN jsonb_build_object('attempt_id', v_id, 'older', coalesce((
        SELECT jsonb_agg(jsonb_build_object('attempt_id', b.id, 'session_id', b.object_id)
                         ORDER BY b.created_at, b.id)
          FROM public.billing_attempts b
         WHERE b.account_id = p_account_id AND b.kind = 'checkout' AND b.status = 'succeeded'
           AND b.object_id IS NOT NULL AND b.object_id <> p_session_id
           AND (b.expires_at IS NULL OR b.expires_at > now())
           AND (b.created_at, b.id) < (v_at, v_id)), '[]'::jsonb));
END;
$$;

CREATE FUNCTION public.billing_checkout_abandoned(p_attempt_id uuid, p_why text)
RETURNS jsonb
LANGUAGE sql VOLATILE
SET search_path = ''
AS $$
    WITH u AS (
        UPDATE public.billing_attempts SET status = 'abandoned', error = left(p_why, 500)
         WHERE id = p_attempt_id AND kind = 'checkout' AND status = 'succeeded'
        RETURNING 1)
    SELECT jsonb_build_object('abandoned', EXISTS (SELECT 1 FROM u));
$$;

DO $grants$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'public.billing_checkout_older_open(uuid, text)',
        'public.billing_checkout_abandoned(uuid, text)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
    END LOOP;
END
$grants$;
