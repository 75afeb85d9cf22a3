-- 211_pending_customer_past_resume.sql: a pending customer attempt of the same email is
-- looked for at Stripe once it is within an hour of the end of its resume
-- (billing_customer_emails), and billing_attempt_begin resumes it until that end
-- (billing_attempt_resume_window), then gives it up for a new key.
BEGIN;
SELECT plan(11);
\ir _helpers.inc

INSERT INTO auth.users (id, aud, role, email)
VALUES ('21100000-0000-4000-8000-000000000001', 'authenticated', 'authenticated', 'me+x@example.com');
CREATE FUNCTION pg_temp.begin() RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.billing_attempt_begin('21100000-0000-4000-8000-000000000001', 'customer',
                                        repeat('a', 64), 'me+x@example.com')
$$;
CREATE FUNCTION pg_temp.emails() RETURNS text[] LANGUAGE sql AS $$
    SELECT public.billing_customer_emails('21100000-0000-4000-8000-000000000001', 'me+x@example.com')
$$;
CREATE FUNCTION pg_temp.aged(p interval) RETURNS void LANGUAGE sql AS $$
    UPDATE public.billing_attempts SET created_at = now() - p
     WHERE account_id = '21100000-0000-4000-8000-000000000001'
$$;

SELECT is(public.billing_attempt_resume_window('customer'), interval '23 hours', 'customer: 23 hours');
SELECT is(public.billing_attempt_resume_window('checkout'), interval '23 hours', 'checkout: 23 hours');
SELECT is(public.billing_attempt_resume_window('portal'), interval '1 minute', 'portal: a minute');

SELECT pg_temp.begin();
SELECT is(pg_temp.emails(), '{}'::text[], 'a fresh pending attempt of the same email is resumed: nothing to look for');
SELECT pg_temp.aged(interval '21 hours 59 minutes');
SELECT is(pg_temp.emails(), '{}'::text[], 'nor at 21 h 59');
SELECT pg_temp.aged(interval '22 hours');
SELECT is(pg_temp.emails(), ARRAY['me+x@example.com'],
          'within an hour of the end of its resume: looked for under its email');
SELECT is((pg_temp.begin() ->> 'resumed')::boolean, true, 'and still resumed by the same request');
SELECT pg_temp.aged(interval '30 hours');
SELECT is(pg_temp.emails(), ARRAY['me+x@example.com'],
          'past its resume (a user back a day later): looked for before a new key is sent');
SELECT is((pg_temp.begin() ->> 'resumed')::boolean, false, 'given up: a new attempt');
SELECT is((SELECT array_agg(status ORDER BY created_at) FROM public.billing_attempts
            WHERE account_id = '21100000-0000-4000-8000-000000000001'),
          ARRAY['abandoned', 'pending'], 'the old one abandoned, the new one pending');
SELECT is(pg_temp.cell('21100000-0000-4000-8000-000000000001', $$SELECT public.billing_attempt_resume_window('customer')$$),
          'err:42501', 'a user cannot call it');

SELECT * FROM finish();
ROLLBACK;
