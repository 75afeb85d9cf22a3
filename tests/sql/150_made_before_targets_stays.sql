-- 150_made_before_targets_stays.sql (150_made_before_targets_stays.sql): an instance
-- made on DOKKU_PROVISIONER_URL before targets existed goes on being made there once
-- targets are registered without --adopt, though a target has room:
--   A: its create failed there (a half-made instance: apps, storage, its homeserver);
--   B: it was stopped before its create ever succeeded, and is resumed.
-- Placed on a target, each was made again there, and what it had on
-- DOKKU_PROVISIONER_URL was orphaned for good (its stop, destroy and retention went
-- to the target). An instance inserted while targets existed and none had room still
-- waits for room and is placed (C).
BEGIN;
\ir _helpers.inc
SELECT plan(8);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('a1500000-0000-4000-8000-0000000000a1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active'),
    ('b1500000-0000-4000-8000-0000000000b1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active'),
    ('c1500000-0000-4000-8000-0000000000c1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;
CREATE TEMP TABLE c (k text PRIMARY KEY, j jsonb);

-- No target yet. A's create goes to DOKKU_PROVISIONER_URL and fails there.
INSERT INTO ids SELECT 'a', (public.lifecycle_provision('a1500000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
INSERT INTO c SELECT 'a', public.lifecycle_claim('w1', 600);
SELECT public.lifecycle_finish(pg_temp.id('a'), (SELECT j #>> '{step,token}' FROM c WHERE k = 'a'),
                               '{"ok": false, "error": "provisioner POST /apps answered 500"}', 600, 1, 1);
-- B is stopped there before its create succeeded (its create failed, then the stop).
INSERT INTO ids SELECT 'b', (public.lifecycle_provision('b1500000-0000-4000-8000-0000000000b1') #>> '{instance,id}')::uuid;
INSERT INTO c SELECT 'b', public.lifecycle_claim('w1', 600);
SELECT public.lifecycle_finish(pg_temp.id('b'), (SELECT j #>> '{step,token}' FROM c WHERE k = 'b'),
                               '{"ok": false, "error": "provisioner POST /apps answered 500"}', 600, 1, 1);
SELECT public.lifecycle_deprovision(pg_temp.id('b'), NULL, 'stop', false);
UPDATE public.instances SET next_attempt_at = NULL WHERE id = pg_temp.id('b');
DELETE FROM c WHERE k = 'b';
INSERT INTO c SELECT 'b', public.lifecycle_claim('w1', 600);
SELECT public.lifecycle_finish(pg_temp.id('b'), (SELECT j #>> '{step,token}' FROM c WHERE k = 'b'),
                               '{"ok": true}', 600, 1, 1);
SELECT is((SELECT string_agg(status::text || '/' || coalesce(provisioned_at::text, 'never'), ',' ORDER BY k)
             FROM public.instances JOIN ids USING (id)), 'failed/never,stopped/never',
          'A failed and B stopped on DOKKU_PROVISIONER_URL, neither ever provisioned');

-- A target with room is registered, without --adopt. A's retry is due; B is resumed.
INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (951, 'roomy', 'http://10.0.0.9:8002', 'env:ROOMY_TOKEN', 1000000);
UPDATE public.instances SET next_attempt_at = NULL WHERE id = pg_temp.id('a');
SELECT public.lifecycle_provision('b1500000-0000-4000-8000-0000000000b1');
SELECT is((SELECT count(*) FROM public.lifecycle_waiting() w JOIN ids ON ids.id = w.instance_id), 0::bigint,
          'neither waits for room: each has its provisioner');
SELECT is(public.instance_place(pg_temp.id('a')), NULL, 'nor is A placed on the target');
DELETE FROM c;
INSERT INTO c SELECT 'x', public.lifecycle_claim('w1', 600);
INSERT INTO c SELECT 'y', public.lifecycle_claim('w1', 600);
SELECT is((SELECT string_agg((SELECT k FROM ids WHERE id = (j #>> '{step,instance_id}')::uuid)
                             || ':' || (j #>> '{step,action}'), ',' ORDER BY k) FROM c),
          'a:create,b:start', 'A''s create and B''s start are handed to a worker');
SELECT is((SELECT count(*) FROM c WHERE j #> '{step,target}' = 'null'::jsonb), 2::bigint,
          'both to DOKKU_PROVISIONER_URL, where their apps and data are');
SELECT is((SELECT count(*) FROM public.instances JOIN ids USING (id) WHERE target_id IS NOT NULL), 0::bigint,
          'neither is on the target');

-- C is inserted while the only target has no room: it waits, and is placed once it has.
UPDATE public.provisioner_targets SET capacity_mb = 1 WHERE id = 951;
INSERT INTO ids SELECT 'c', (public.lifecycle_provision('c1500000-0000-4000-8000-0000000000c1') #>> '{instance,id}')::uuid;
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE id = pg_temp.id('c')),
          'no_capacity', 'C waits for room');
UPDATE public.provisioner_targets SET capacity_mb = 1000000 WHERE id = 951;
SELECT is((SELECT (public.lifecycle_claim('w1', 600) #>> '{step,target,target}')), 'roomy',
          'C is placed on the target once it has room, and created there');
SELECT * FROM finish();
ROLLBACK;
