-- 175_customer_emails.sql: a customer Stripe may have made for an account is looked for
-- under the email its attempt sent, not only the account's email of now.
--
-- Before making an account's Stripe customer, the checkout looks for one Stripe may
-- have made behind an attempt whose outcome we never learnt (169_customer_found.sql):
-- it lists Stripe's customers by email, and Stripe's filter is the exact email. It
-- listed by the account's email of now. A user who changed their email between that
-- attempt and the next checkout was given a second customer: the first, made under
-- the old email, was not found. The same held for a pending attempt of the old email:
-- the next checkout's request differs from it, so it is not resumed but abandoned,
-- and its customer was not looked for at all.
--
-- - billing_attempts.email (new): the email a customer attempt sent (NULL for the
--   other kinds, and for customer attempts recorded before this migration);
-- - billing_attempt_begin(account, kind, fingerprint, email) (new): begin as before
--   (the three-argument form, unchanged) and record the email on the customer attempt
--   it returns to send;
-- - billing_customer_emails(account, email) (new): the emails to look under before a
--   customer attempt that would send `email`, the newest first; none while no attempt
--   is unsure. An attempt is unsure when it was closed without a customer ('failed' or
--   'abandoned', as billing_customer_unsure) or is pending with another email (it will
--   not be resumed: the next request is not its own). An unsure attempt recorded
--   before this migration (no email) is looked for under `email`, as before;
-- - billing_customer_unsure(account): redefined from 169_customer_found.sql as whether
--   billing_customer_emails names any email for the account's email of now, so that
--   "unsure" is one rule (a function built before 175 still calls it).

ALTER TABLE public.billing_attempts ADD COLUMN email text;
COMMENT ON COLUMN public.billing_attempts.email IS
    'the email a customer attempt sent (NULL for checkout and portal attempts, and for customer attempts recorded before 175)';

CREATE FUNCTION public.billing_attempt_begin(p_account_id uuid, p_kind text, p_fingerprint text,
                                             p_email text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v jsonb := public.billing_attempt_begin(p_account_id, p_kind, p_fingerprint);
BEGIN
    -- A resumed attempt has the same fingerprint, hence sent the same email.
    IF p_kind = 'customer' AND p_email IS NOT NULL AND v ? 'attempt_id' THEN
        UPDATE public.billing_attempts SET email = p_email
         WHERE id = (v ->> 'attempt_id')::uuid AND email IS NULL;
    END IF;
    RETURN v;
END;
$$;

CREATE FUNCTION public.billing_customer_emails(p_account_id uuid, p_email text)
RETURNS text[]
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    WITH unsure AS (
        SELECT b.email, b.created_at AS at
          FROM public.billing_attempts b
         WHERE b.account_id = p_account_id AND b.kind = 'customer'
           AND (b.status IN ('failed', 'abandoned')
                OR (b.status = 'pending' AND b.email IS DISTINCT FROM p_email
                    AND b.email IS NOT NULL)))
    SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM unsure) THEN '{}'::text[] ELSE ARRAY(
        SELECT e.email
          FROM (SELECT p_email AS email, 'infinity'::timestamptz AS at
                UNION ALL SELECT u.email, u.at FROM unsure u) e
         WHERE e.email IS NOT NULL AND e.email <> ''
         GROUP BY e.email
         ORDER BY max(e.at) DESC, e.email
         LIMIT 5) END
$$;

CREATE OR REPLACE FUNCTION public.billing_customer_unsure(p_account_id uuid)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT cardinality(public.billing_customer_emails(
               p_account_id, (SELECT a.email FROM public.accounts a WHERE a.id = p_account_id))) > 0
$$;

DO $grants$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'public.billing_attempt_begin(uuid, text, text, text)',
        'public.billing_customer_emails(uuid, text)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
    END LOOP;
END
$grants$;
