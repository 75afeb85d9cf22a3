-- 170_target_answering.sql: the worker records a target that stopped answering and
-- one that answers again (public.target_answered, writing only a change); placement
-- prefers the targets that answer, still uses one that does not when nothing else
-- has room, and keeps kept storage where it is; the target a step and a teardown
-- carry says whether it answers; least privilege.
BEGIN;
SELECT plan(18);
\ir _helpers.inc

INSERT INTO public.provisioner_targets (id, name, url, token_ref, scheduler, capacity_mb)
VALUES (971, 'roomy', 'http://10.0.0.71:8002', 'env:ROOMY_TOKEN', 'docker-local', 1000000),
       (972, 'small', 'http://10.0.0.72:8002', 'env:SMALL_TOKEN', 'docker-local', 100000);
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
SELECT ('a1700000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid,
       '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active'
  FROM generate_series(1, 6) n;
CREATE FUNCTION pg_temp.place(p_n integer) RETURNS text LANGUAGE sql AS $$
    INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain)
    VALUES (('a1700000-0000-4000-8000-' || lpad(p_n::text, 12, '0'))::uuid,
            'mindroom-a17' || p_n, 'ma17' || p_n)
    RETURNING (SELECT t.name FROM public.provisioner_targets t WHERE t.id = target_id)
$$;
GRANT EXECUTE ON FUNCTION pg_temp.place(integer) TO service_role;

-- Least privilege: the worker's record is service_role's alone.
SELECT is(pg_temp.cell('anon', $$SELECT public.target_answered('roomy', false)$$), 'err:42501',
          'anon cannot record a target''s answers');
SELECT is(pg_temp.cell('5eed5eed-0000-4000-8000-000000000001', $$SELECT public.target_answered('roomy', false)$$),
          'err:42501', 'nor can a tenant');

SET LOCAL role service_role;

SELECT is(pg_temp.place(1), 'roomy', 'both answer: the most free memory, as before');
SELECT is(public.lifecycle_target_of((SELECT id FROM public.instances WHERE dokku_app_name = 'mindroom-a171')),
          '{"url": "http://10.0.0.71:8002", "target": "roomy", "enabled": true, "scheduler": "docker-local", "token_ref": "env:ROOMY_TOKEN", "answering": true}'::jsonb,
          'a step''s target says it answers');

-- roomy's call goes unanswered.
SELECT is(public.target_answered('roomy', false), true, 'a call without an answer is recorded');
SELECT ok((SELECT unanswered_since IS NOT NULL FROM public.provisioner_targets WHERE id = 971),
          'roomy: unanswered_since is set');
SELECT is(public.target_answered('roomy', false), false, 'a second one writes nothing');
SELECT is(public.target_answered('small', true), false, 'an answer from a target that answers writes nothing');
SELECT is((public.lifecycle_target_of((SELECT id FROM public.instances WHERE dokku_app_name = 'mindroom-a171'))
           ->> 'answering')::boolean, false, 'a step''s target says it does not answer');

SELECT is(pg_temp.place(2), 'small', 'a new instance goes to the target that answers, though it has less room');
SELECT is(pg_temp.place(3), 'small', 'and the next');

-- Kept storage stays where it is: an instance re-created under the names of a destroyed
-- instance whose data roomy keeps goes there.
RESET role;
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status,
                              target_id, provisioned_at, deprovisioned_at)
VALUES ('a1700000-0000-4000-8000-000000000006', 'mindroom-a176', 'ma176', 'deprovisioned',
        'deprovisioned', 971, now() - interval '2 days', now() - interval '1 day');
SET LOCAL role service_role;
SELECT is(pg_temp.place(6), 'roomy', 'a re-created instance goes where its kept storage is, answering or not');

-- Nothing that answers has room: the one that does not still takes the instance.
RESET role;
UPDATE public.provisioner_targets SET capacity_mb = 1 WHERE id = 972;
SET LOCAL role service_role;
SELECT is(pg_temp.place(4), 'roomy', 'no target that answers has room: placed where it fits, made once it answers');

-- roomy answers again. Instance 4's create failed while it was away and backs off for
-- an hour; instance 2's (on small) too; instance 3's was rejected and waits for an
-- operator.
RESET role;
UPDATE public.provisioner_targets SET capacity_mb = 100000 WHERE id = 972;
UPDATE public.instances SET status = 'failed', attempts = 3, last_error = 'connect: refused',
       next_attempt_at = now() + interval '1 hour'
 WHERE dokku_app_name IN ('mindroom-a174', 'mindroom-a172');
UPDATE public.instances SET target_id = 971, status = 'failed', last_error = 'rejected: bad image',
       next_attempt_at = NULL, rejected_actions = ARRAY['create']::public.lifecycle_action[]
 WHERE dokku_app_name = 'mindroom-a173';
SET LOCAL role service_role;
SELECT is(public.target_answered('roomy', true), true, 'an answer is recorded');
SELECT is((SELECT unanswered_since FROM public.provisioner_targets WHERE id = 971), NULL,
          'roomy: unanswered_since cleared');
SELECT is((SELECT array_agg(ARRAY[i.dokku_app_name, (i.owed_due_at <= now())::text,
                                  (i.next_attempt_at IS NULL)::text] ORDER BY i.dokku_app_name)
             FROM public.instances i WHERE i.dokku_app_name IN ('mindroom-a172', 'mindroom-a173', 'mindroom-a174')),
          ARRAY[ARRAY['mindroom-a172', 'false', 'false'], ARRAY['mindroom-a173', NULL, 'true'],
                ARRAY['mindroom-a174', 'true', 'false']],
          'its instance''s create backing off is due at once; another target''s is not, nor is a rejected one given a next attempt');
SELECT is(pg_temp.place(5), 'roomy', 'new instances go by free memory again');

-- A teardown carries the same object.
RESET role;
DELETE FROM public.instances WHERE dokku_app_name = 'mindroom-a175';
SET LOCAL role service_role;
SELECT is((SELECT target ->> 'answering' FROM public.instance_teardowns_due(100) t
            JOIN public.instance_teardowns d USING (instance_id) WHERE d.dokku_app_name = 'mindroom-a175'),
          'true', 'a teardown''s target says whether it answers');

SELECT * FROM finish();
ROLLBACK;
