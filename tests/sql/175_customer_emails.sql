-- 175_customer_emails.sql: a customer attempt records the email it sent
-- (billing_attempt_begin with an email), and the checkout looks for a customer Stripe
-- may have made under every email an unsure attempt sent and the one it would send
-- (billing_customer_emails, and billing_customer_unsure as the same rule).
BEGIN;
SELECT plan(16);
\ir _helpers.inc

INSERT INTO auth.users (id, aud, role, email)
VALUES ('17500000-0000-4000-8000-000000000001', 'authenticated', 'authenticated', 'old@example.com'),
       ('17500000-0000-4000-8000-000000000002', 'authenticated', 'authenticated', 'other@example.com');
CREATE FUNCTION pg_temp.begin(p_kind text, p_n int, p_email text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.billing_attempt_begin('17500000-0000-4000-8000-000000000001', p_kind,
                                        repeat(p_n::text, 64), p_email)
$$;
CREATE FUNCTION pg_temp.emails(p_email text) RETURNS text[] LANGUAGE sql AS $$
    SELECT public.billing_customer_emails('17500000-0000-4000-8000-000000000001', p_email)
$$;
CREATE FUNCTION pg_temp.email_of(p_attempt jsonb) RETURNS text LANGUAGE sql AS $$
    SELECT b.email FROM public.billing_attempts b WHERE b.id = (p_attempt ->> 'attempt_id')::uuid
$$;

-- Recording.
SELECT is(pg_temp.email_of(pg_temp.begin('customer', 1, 'old@example.com')), 'old@example.com',
          'a customer attempt records the email it sends');
SELECT is(pg_temp.email_of(pg_temp.begin('customer', 1, 'old@example.com')), 'old@example.com',
          'resumed, it keeps it');
SELECT is((SELECT count(*) FROM public.billing_attempts
            WHERE account_id = '17500000-0000-4000-8000-000000000001')::int, 1,
          'resumed: still one attempt');
SELECT is(pg_temp.email_of(pg_temp.begin('checkout', 2, 'old@example.com')), NULL,
          'a checkout attempt records none');
SELECT is(pg_temp.email_of(public.billing_attempt_begin('17500000-0000-4000-8000-000000000002',
                                                        'customer', repeat('3', 64))), NULL,
          'the three-argument form records none');

-- What to look under.
SELECT is(pg_temp.emails('old@example.com'), '{}'::text[],
          'a pending attempt of the same email is resumed: nothing to look for');
SELECT is(pg_temp.emails('new@example.com'), ARRAY['new@example.com', 'old@example.com'],
          'a pending attempt of another email is given up by the next request: both');
UPDATE auth.users SET email = 'new@example.com' WHERE id = '17500000-0000-4000-8000-000000000001';
SELECT is(public.billing_customer_unsure('17500000-0000-4000-8000-000000000001'), true,
          'billing_customer_unsure is the same rule, for the account''s email of now');
UPDATE auth.users SET email = 'old@example.com' WHERE id = '17500000-0000-4000-8000-000000000001';
UPDATE public.billing_attempts SET status = 'failed' WHERE kind = 'customer'
   AND account_id = '17500000-0000-4000-8000-000000000001';
SELECT is(pg_temp.emails('old@example.com'), ARRAY['old@example.com'],
          'a failed attempt of the same email: that email once');
SELECT is(pg_temp.emails('new@example.com'), ARRAY['new@example.com', 'old@example.com'],
          'a failed attempt of the email before: the new one first, then the old');
SELECT is(public.billing_customer_emails('17500000-0000-4000-8000-000000000002', 'other@example.com'),
          '{}'::text[], 'another account''s attempts are not this one''s');
INSERT INTO public.billing_attempts (account_id, kind, idempotency_key, fingerprint, status)
VALUES ('17500000-0000-4000-8000-000000000002', 'customer', 'mindroom-customer-t175', repeat('4', 64),
        'abandoned');
SELECT is(public.billing_customer_emails('17500000-0000-4000-8000-000000000002', 'other@example.com'),
          ARRAY['other@example.com'],
          'an unsure attempt recorded before 175 (no email): looked for under the email of now');
INSERT INTO public.billing_attempts (account_id, kind, idempotency_key, fingerprint, status, email,
                                     created_at)
SELECT '17500000-0000-4000-8000-000000000001', 'customer', 'mindroom-customer-t' || i,
       repeat('5', 64), 'failed', 'e' || i || '@example.com', now() + make_interval(secs => i)
  FROM generate_series(1, 6) AS i;
SELECT is(pg_temp.emails('new@example.com'),
          ARRAY['new@example.com', 'e6@example.com', 'e5@example.com', 'e4@example.com',
                'e3@example.com'],
          'at most five, the newest first');

-- Who may call.
SELECT is(pg_temp.cell('anon', $$SELECT public.billing_customer_emails('17500000-0000-4000-8000-000000000001', 'x@example.com')$$),
          'err:42501', 'anon cannot list an account''s emails');
SELECT is(pg_temp.cell('17500000-0000-4000-8000-000000000001',
                       $$SELECT public.billing_attempt_begin('17500000-0000-4000-8000-000000000001', 'customer', repeat('6', 64), 'x@example.com')$$),
          'err:42501', 'nor can the account''s own user begin an attempt');
SELECT isnt(pg_temp.cell('service_role', $$SELECT public.billing_customer_emails('17500000-0000-4000-8000-000000000001', 'x@example.com')$$),
            'err:42501', 'service_role can');

SELECT * FROM finish();
ROLLBACK;
