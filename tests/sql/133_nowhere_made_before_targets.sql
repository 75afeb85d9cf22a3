-- 133_nowhere_made_before_targets.sql (133_made_nowhere_yet.sql, instance_nowhere): a stop or destroy is
-- recorded done by the claim, calling nobody, only when nothing of the instance
-- exists anywhere. "No attempt counted" is not that: an attempt is counted only when
-- a failure is recorded, and reset by any success. Two instances whose create went
-- to DOKKU_PROVISIONER_URL before targets existed:
--   A: its create was under way when the worker was restarted (the call aborted, the
--      lease given back: lifecycle_release counts nothing);
--   B: its create failed (a half-made instance: its homeserver up), then it was
--      stopped there (a success: attempts back to 0).
-- Targets are then registered (without --adopt: those instances stay on
-- DOKKU_PROVISIONER_URL) and both subscriptions are cancelled. Their destroys must go
-- to DOKKU_PROVISIONER_URL; recorded done with the storage "destroyed", their apps
-- and data there are orphaned for good (nothing will ever tear them down).
BEGIN;
\ir _helpers.inc
SELECT plan(4);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('a1300000-0000-4000-8000-0000000000a1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active'),
    ('b1300000-0000-4000-8000-0000000000b1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;
CREATE TEMP TABLE c (k text PRIMARY KEY, j jsonb);

-- No target yet: every step goes to DOKKU_PROVISIONER_URL.
INSERT INTO ids SELECT 'a', (public.lifecycle_provision('a1300000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
INSERT INTO c SELECT 'a', public.lifecycle_claim('w1', 600);
-- The worker is restarted while A's POST /apps runs: aborted, lease given back.
SELECT public.lifecycle_release(pg_temp.id('a'), (SELECT j #>> '{step,token}' FROM c WHERE k = 'a'));

INSERT INTO ids SELECT 'b', (public.lifecycle_provision('b1300000-0000-4000-8000-0000000000b1') #>> '{instance,id}')::uuid;
UPDATE public.instances SET created_at = now() - interval '1 hour', owed_since = now() - interval '1 hour'
 WHERE id = pg_temp.id('a');
-- (A is held by another worker meanwhile, so the next claim is B's create.)
SELECT public.lifecycle_take(pg_temp.id('a'), 'held/w2', 'w2', 600);
INSERT INTO c SELECT 'b', public.lifecycle_claim('w1', 600);
SELECT public.lifecycle_finish(pg_temp.id('b'), (SELECT j #>> '{step,token}' FROM c WHERE k = 'b'),
                               '{"ok": false, "error": "provisioner POST /apps answered 500"}', 600, 1, 1);
SELECT public.lifecycle_release(pg_temp.id('a'), 'held/w2');
-- B's customer stops paying: B is stopped on DOKKU_PROVISIONER_URL.
SELECT public.lifecycle_deprovision(pg_temp.id('b'), NULL, 'stop', false);
UPDATE public.instances SET next_attempt_at = NULL WHERE id = pg_temp.id('b');
SELECT public.lifecycle_take(pg_temp.id('a'), 'held/w2', 'w2', 600);
DELETE FROM c WHERE k = 'b';
INSERT INTO c SELECT 'b', public.lifecycle_claim('w1', 600);
SELECT public.lifecycle_finish(pg_temp.id('b'), (SELECT j #>> '{step,token}' FROM c WHERE k = 'b'),
                               '{"ok": true}', 600, 1, 1);
SELECT public.lifecycle_release(pg_temp.id('a'), 'held/w2');
SELECT is((SELECT status::text || '/' || attempts FROM public.instances WHERE id = pg_temp.id('b')),
          'stopped/0', 'B, half made on DOKKU_PROVISIONER_URL, is stopped there');

-- A target is registered (a new host, small); both subscriptions are cancelled.
INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (981, 'new', 'http://10.0.0.9:8002', 'env:NEW_TOKEN', 1);
SELECT public.lifecycle_deprovision(pg_temp.id('a'), NULL, 'destroy', false);
SELECT public.lifecycle_deprovision(pg_temp.id('b'), NULL, 'destroy', false);
CREATE TEMP TABLE d AS
SELECT public.lifecycle_claim('w1', 600) AS j1, public.lifecycle_claim('w1', 600) AS j2;
SELECT is((SELECT (j1 #>> '{step,action}') || ',' || (j2 #>> '{step,action}') FROM d), 'destroy,destroy',
          'both destroys are handed to a worker (to DOKKU_PROVISIONER_URL, where their apps are)');
SELECT is((SELECT storage_destroyed_at FROM public.instances WHERE id = pg_temp.id('a')), NULL,
          'A''s storage on DOKKU_PROVISIONER_URL is not recorded destroyed without a call');
SELECT is((SELECT storage_destroyed_at FROM public.instances WHERE id = pg_temp.id('b')), NULL,
          'B''s storage on DOKKU_PROVISIONER_URL is not recorded destroyed without a call');
SELECT * FROM finish();
ROLLBACK;
