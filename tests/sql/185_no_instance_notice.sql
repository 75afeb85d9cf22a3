-- 185_no_instance_notice.sql: what my-instance's 404 tells a customer without an
-- instance (tenant_no_instance_notice): a first payment still processing, one that did
-- not complete, or nothing; only ever of the caller's own subscriptions.
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(8);

CREATE FUNCTION pg_temp.code(p_who text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v text;
BEGIN
    PERFORM pg_temp.become(p_who);
    v := coalesce(public.tenant_no_instance_notice() ->> 'code', 'none');
    PERFORM pg_temp.unbecome();
    RETURN v;
END $$;

-- A's instance-less subscription (…0006) and B: both have only entitled ones.
SELECT is(pg_temp.code('aaaaaaaa-0000-4000-8000-000000000001'), 'none',
          'an entitled subscription without an instance (yet) says nothing here');

UPDATE public.subscriptions SET status = 'incomplete' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000006';
SELECT is(pg_temp.code('aaaaaaaa-0000-4000-8000-000000000001'), 'payment_processing',
          'a first payment processing: said so');
SELECT is(pg_temp.code('bbbbbbbb-0000-4000-8000-000000000001'), 'none',
          'never another account''s subscription');

-- B: a first payment given up, then a newer subscription processing (or the reverse).
INSERT INTO public.subscriptions (id, account_id, tier, status, created_at)
VALUES ('bbbbbbbb-0000-4000-8000-000000000006', 'bbbbbbbb-0000-4000-8000-000000000001', 'starter',
        'incomplete_expired', now() - interval '2 days');
SELECT is(pg_temp.code('bbbbbbbb-0000-4000-8000-000000000001'), 'payment_not_completed',
          'a first payment given up: said it did not complete');
SELECT is(public.tenant_instance_notice(NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'incomplete_expired',
                                        NULL, NULL, NULL) ->> 'message',
          'Your first payment did not complete, so no instance was created: subscribe again to get one.',
          'and what to do');
INSERT INTO public.subscriptions (id, account_id, tier, status, created_at)
VALUES ('bbbbbbbb-0000-4000-8000-000000000007', 'bbbbbbbb-0000-4000-8000-000000000001', 'starter',
        'incomplete', now() - interval '3 days');
SELECT is(pg_temp.code('bbbbbbbb-0000-4000-8000-000000000001'), 'payment_processing',
          'one still processing before a newer one given up: an instance may still come');

SELECT is(pg_temp.cell('anon', 'SELECT public.tenant_no_instance_notice()'), 'err:42501', 'anon may not');
SELECT is(pg_temp.cell('service_role', 'SELECT public.tenant_no_instance_notice()'), 'err:42501',
          'a service key has no "my"');

SELECT * FROM finish();
ROLLBACK;
