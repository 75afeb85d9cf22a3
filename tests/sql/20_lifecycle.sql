-- 20_lifecycle.sql: the lease and the owed-work rules of 020_lifecycle.sql.
BEGIN;
SELECT plan(54);

-- Fixtures: the seed's account; one subscription per scenario.
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('20000000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active'),
  ('22000000-0000-4000-8000-000000000002', '5eed5eed-0000-4000-8000-000000000001', 'price_free', 'free', 'unpaid'),
  ('23000000-0000-4000-8000-000000000003', '5eed5eed-0000-4000-8000-000000000001', 'price_professional', 'professional', 'cancelled'),
  ('24000000-0000-4000-8000-000000000004', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');

SET LOCAL role service_role;
CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);

-- a caller without a free worker (p_owner NULL): the row is made, the work left owed.
SELECT is(public.lifecycle_provision('20000000-0000-4000-8000-000000000001', NULL, 60, true)->>'outcome',
          'queued', 'no free worker: queued, not claimed');
SELECT results_eq($$SELECT status::text, claimed_by FROM public.instances
                     WHERE subscription_id = '20000000-0000-4000-8000-000000000001'$$,
                  $$VALUES ('provisioning', NULL::text)$$, 'queued: row exists, no lease');

-- provision: creates the row with deterministic names and plan limits, claims it.
INSERT INTO r VALUES ('p1', public.lifecycle_provision('20000000-0000-4000-8000-000000000001', 'w1', 60, true));
SELECT is((SELECT v->>'outcome' FROM r WHERE k = 'p1'), 'claimed', 'first provision claims');
SELECT is((SELECT v#>>'{step,action}' FROM r WHERE k = 'p1'), 'create', 'first step is create');
SELECT is((SELECT v#>>'{instance,dokku_app_name}' FROM r WHERE k = 'p1'), 'mindroom-200000000000', 'app name from instance_names()');
SELECT is((SELECT v#>>'{step,payload,memory_mb}' FROM r WHERE k = 'p1'), '1024', 'starter memory reaches the payload');
SELECT is((SELECT v#>>'{step,payload,cpu}' FROM r WHERE k = 'p1'), '1.00', 'starter cpu reaches the payload');
SELECT is((SELECT v#>>'{step,payload,env,MINDROOM_SUBDOMAIN}' FROM r WHERE k = 'p1'), 'm200000000000', 'env carries the subdomain');
SELECT ok((SELECT NOT (v->'instance' ? 'environment_vars') FROM r WHERE k = 'p1'), 'instance JSON never carries environment_vars');
SELECT ok((SELECT NOT (v->'instance' ? 'claimed_by') FROM r WHERE k = 'p1'), 'instance JSON never carries the lease token');

-- a second call while the lease is live: busy, nothing else written.
SELECT is(public.lifecycle_provision('20000000-0000-4000-8000-000000000001', 'w2', 60, true)->>'outcome',
          'busy', 'second provision during a live lease is busy');
SELECT is((SELECT count(*)::int FROM public.instances WHERE subscription_id = '20000000-0000-4000-8000-000000000001'),
          1, 'still one instance row');
SELECT is((SELECT count(*)::int FROM public.lifecycle_owed(100) o
            WHERE o.subscription_id = '20000000-0000-4000-8000-000000000001'),
          0, 'a leased instance is not owed to the sweep');

-- a stale worker (wrong token) cannot record anything.
SELECT is(public.lifecycle_finish((SELECT (v#>>'{step,instance_id}')::uuid FROM r WHERE k = 'p1'), 'not-the-token',
          '{"ok": true, "frontend_url": "https://evil"}', 60, 30, 3600, true)->>'outcome', 'lost', 'wrong token: lost');
SELECT is((SELECT frontend_url FROM public.instances WHERE subscription_id = '20000000-0000-4000-8000-000000000001'),
          NULL, 'wrong token wrote nothing');

-- provisioner failure: failed, attempts 1, backoff base * 2^0, lease released.
INSERT INTO r VALUES ('f1', public.lifecycle_finish((SELECT (v#>>'{step,instance_id}')::uuid FROM r WHERE k = 'p1'),
          (SELECT v#>>'{step,token}' FROM r WHERE k = 'p1'),
          '{"ok": false, "error": "provisioner create answered 500"}', 60, 30, 3600, true));
SELECT is((SELECT v->>'outcome' FROM r WHERE k = 'f1'), 'failed', 'failure recorded');
SELECT results_eq($$SELECT status::text, attempts, last_error, claimed_by IS NULL,
                           next_attempt_at = now() + interval '30 seconds'
                      FROM public.instances WHERE subscription_id = '20000000-0000-4000-8000-000000000001'$$,
                  $$VALUES ('failed', 1, 'provisioner create answered 500', true, true)$$,
                  'failed, attempt 1, backoff 30 s, lease released');
SELECT is((SELECT count(*)::int FROM public.lifecycle_owed(100) o
            WHERE o.subscription_id = '20000000-0000-4000-8000-000000000001'),
          0, 'not owed before its backoff');

-- retry (explicit call ignores backoff), second failure doubles the backoff.
INSERT INTO r VALUES ('p2', public.lifecycle_provision('20000000-0000-4000-8000-000000000001', 'w1', 60, true));
SELECT is((SELECT v#>>'{instance,status}' FROM r WHERE k = 'p2'), 'provisioning', 'failed -> provisioning on a new claim');
SELECT is(public.lifecycle_finish((SELECT (v#>>'{step,instance_id}')::uuid FROM r WHERE k = 'p2'),
          (SELECT v#>>'{step,token}' FROM r WHERE k = 'p2'),
          '{"ok": false, "error": "timeout"}', 60, 30, 3600, true)->>'outcome', 'failed', 'second failure');
SELECT results_eq($$SELECT attempts, next_attempt_at = now() + interval '60 seconds'
                      FROM public.instances WHERE subscription_id = '20000000-0000-4000-8000-000000000001'$$,
                  $$VALUES (2, true)$$, 'attempt 2 backs off 60 s');
UPDATE public.instances SET next_attempt_at = now() - interval '1 second'
 WHERE subscription_id = '20000000-0000-4000-8000-000000000001';
SELECT results_eq($$SELECT action, function_name, body FROM public.lifecycle_owed(100)
                     WHERE subscription_id = '20000000-0000-4000-8000-000000000001'$$,
                  $$VALUES ('create', 'provision-instance',
                            '{"subscription_id": "20000000-0000-4000-8000-000000000001"}'::jsonb)$$,
                  'due after its backoff: the sweep calls provision-instance');

-- success: running with URLs, counters cleared, next step is the welcome email.
INSERT INTO r VALUES ('p3', public.lifecycle_provision('20000000-0000-4000-8000-000000000001', 'w1', 60, true));
INSERT INTO r VALUES ('s3', public.lifecycle_finish((SELECT (v#>>'{step,instance_id}')::uuid FROM r WHERE k = 'p3'),
          (SELECT v#>>'{step,token}' FROM r WHERE k = 'p3'),
          jsonb_build_object('ok', true, 'frontend_url', 'https://m200000000000.example', 'backend_url', 'https://api',
                             'matrix_server_url', 'https://matrix', 'config_hash', (SELECT v#>>'{step,config_hash}' FROM r WHERE k = 'p3')),
          60, 30, 3600, true));
SELECT is((SELECT v#>>'{step,action}' FROM r WHERE k = 's3'), 'email', 'after create: the welcome email, same lease');
SELECT is((SELECT v#>>'{step,email,to}' FROM r WHERE k = 's3'), 'test@example.com', 'email goes to the account');
SELECT is((SELECT v#>>'{step,token}' FROM r WHERE k = 's3'), (SELECT v#>>'{step,token}' FROM r WHERE k = 'p3'), 'same token');
SELECT results_eq($$SELECT status::text, attempts, last_error, next_attempt_at, frontend_url, provisioned_at IS NOT NULL
                      FROM public.instances WHERE subscription_id = '20000000-0000-4000-8000-000000000001'$$,
                  $$VALUES ('running', 0, NULL::text, NULL::timestamptz, 'https://m200000000000.example', true)$$,
                  'running, URLs, retry state cleared');

-- email failure: recorded on its own columns, never on the instance status.
SELECT is(public.lifecycle_finish((SELECT (v#>>'{step,instance_id}')::uuid FROM r WHERE k = 'p3'),
          (SELECT v#>>'{step,token}' FROM r WHERE k = 'p3'),
          '{"ok": false, "error": "resend answered 500"}', 60, 30, 3600, true)->>'outcome', 'failed', 'email failed');
SELECT results_eq($$SELECT status::text, welcome_email_sent_at, welcome_email_attempts, welcome_email_error, claimed_by
                      FROM public.instances WHERE subscription_id = '20000000-0000-4000-8000-000000000001'$$,
                  $$VALUES ('running', NULL::timestamptz, 1, 'resend answered 500', NULL::text)$$,
                  'still running; email owed');
UPDATE public.instances SET welcome_email_next_at = now() - interval '1 second'
 WHERE subscription_id = '20000000-0000-4000-8000-000000000001';
SELECT is((SELECT action FROM public.lifecycle_owed(100) WHERE subscription_id = '20000000-0000-4000-8000-000000000001'),
          'email', 'owed email is due for the sweep');
INSERT INTO r VALUES ('p4', public.lifecycle_provision('20000000-0000-4000-8000-000000000001', 'w1', 60, true));
SELECT is((SELECT v#>>'{step,action}' FROM r WHERE k = 'p4'), 'email', 'provision of a running instance sends the owed email');
SELECT is(public.lifecycle_finish((SELECT (v#>>'{step,instance_id}')::uuid FROM r WHERE k = 'p4'),
          (SELECT v#>>'{step,token}' FROM r WHERE k = 'p4'), '{"ok": true}', 60, 30, 3600, true)->>'outcome',
          'done', 'email sent: done');
SELECT is(public.lifecycle_provision('20000000-0000-4000-8000-000000000001', 'w1', 60, true)->>'outcome',
          'done', 'running, nothing owed: done (200)');

-- tier upgrade: the trigger changes the limits, provision owes an update.
RESET role;
UPDATE public.subscriptions SET tier = 'professional', stripe_price_id = 'price_professional'
 WHERE id = '20000000-0000-4000-8000-000000000001';
SET LOCAL role service_role;
INSERT INTO r VALUES ('u1', public.lifecycle_provision('20000000-0000-4000-8000-000000000001', 'w1', 60, true));
SELECT is((SELECT v#>>'{step,action}' FROM r WHERE k = 'u1'), 'update', 'changed limits: update');
SELECT is((SELECT v#>>'{step,payload,memory_mb}' FROM r WHERE k = 'u1'), '2048', 'new memory in the payload');
SELECT is((SELECT v#>>'{instance,status}' FROM r WHERE k = 'u1'), 'running', 'an update keeps the app running');
SELECT is(public.lifecycle_finish((SELECT (v#>>'{step,instance_id}')::uuid FROM r WHERE k = 'u1'),
          (SELECT v#>>'{step,token}' FROM r WHERE k = 'u1'),
          jsonb_build_object('ok', true, 'config_hash', (SELECT v#>>'{step,config_hash}' FROM r WHERE k = 'u1')),
          60, 30, 3600, true)->>'outcome', 'done', 'update recorded');

-- stop, then resume the same app.
INSERT INTO r VALUES ('d1', public.lifecycle_deprovision(NULL, '20000000-0000-4000-8000-000000000001', 'stop', 'w1', 60, true));
SELECT is((SELECT v#>>'{step,action}' FROM r WHERE k = 'd1'), 'stop', 'stop mode: stop');
SELECT is(public.lifecycle_finish((SELECT (v#>>'{step,instance_id}')::uuid FROM r WHERE k = 'd1'),
          (SELECT v#>>'{step,token}' FROM r WHERE k = 'd1'), '{"ok": true}', 60, 30, 3600, true)#>>'{instance,status}',
          'stopped', 'stopped');
SELECT is(public.lifecycle_deprovision(NULL, '20000000-0000-4000-8000-000000000001', 'stop', 'w1', 60, true)->>'outcome',
          'done', 'second stop: nothing owed');
INSERT INTO r VALUES ('p5', public.lifecycle_provision('20000000-0000-4000-8000-000000000001', 'w1', 60, true));
SELECT is((SELECT v#>>'{step,action}' FROM r WHERE k = 'p5'), 'start', 'stopped + provision: start');
SELECT is((SELECT v#>>'{step,app}' FROM r WHERE k = 'p5'), 'mindroom-200000000000', 'same app');

-- a dead worker's lease expires and is taken over with a new token.
UPDATE public.instances SET claim_expires_at = now() - interval '1 second'
 WHERE subscription_id = '20000000-0000-4000-8000-000000000001';
SELECT is((SELECT action FROM public.lifecycle_owed(100) WHERE subscription_id = '20000000-0000-4000-8000-000000000001'),
          'create', 'expired lease mid-start: owed (status provisioning -> create)');
INSERT INTO r VALUES ('p6', public.lifecycle_provision('20000000-0000-4000-8000-000000000001', 'w2', 60, true));
SELECT is((SELECT v->>'outcome' FROM r WHERE k = 'p6'), 'claimed', 'expired lease taken over');
SELECT isnt((SELECT v#>>'{step,token}' FROM r WHERE k = 'p6'), (SELECT v#>>'{step,token}' FROM r WHERE k = 'p5'), 'new token');
SELECT is(public.lifecycle_finish((SELECT (v#>>'{step,instance_id}')::uuid FROM r WHERE k = 'p5'),
          (SELECT v#>>'{step,token}' FROM r WHERE k = 'p5'), '{"ok": true}', 60, 30, 3600, true)->>'outcome',
          'lost', 'the dead worker''s late answer is ignored');

-- not entitled: 409 material, nothing written.
SELECT is(public.lifecycle_provision('22000000-0000-4000-8000-000000000002', 'w1', 60, true)->>'outcome',
          'not_entitled', 'unpaid: not entitled');
SELECT is((SELECT count(*)::int FROM public.instances WHERE subscription_id = '22000000-0000-4000-8000-000000000002'),
          0, 'no row for a non-entitled subscription');
SELECT is(public.lifecycle_provision('20000000-0000-4000-8000-0000000000ff', 'w1', 60, true)->>'outcome',
          'not_found', 'unknown subscription');

-- destroy by default for a cancelled subscription; rejection is not retried by the sweep.
RESET role;
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status)
SELECT '23000000-0000-4000-8000-000000000003', n.dokku_app_name, n.subdomain, 'running'
  FROM public.instance_names('23000000-0000-4000-8000-000000000003') n;
SET LOCAL role service_role;
INSERT INTO r VALUES ('x1', public.lifecycle_deprovision(NULL, '23000000-0000-4000-8000-000000000003', NULL, 'w1', 60, true));
SELECT results_eq($$SELECT v->>'mode', v#>>'{step,action}', v#>>'{instance,status}' FROM r WHERE k = 'x1'$$,
                  $$VALUES ('destroy', 'destroy', 'deprovisioning')$$, 'cancelled: destroy by default');
SELECT is(public.lifecycle_finish((SELECT (v#>>'{step,instance_id}')::uuid FROM r WHERE k = 'x1'),
          (SELECT v#>>'{step,token}' FROM r WHERE k = 'x1'),
          '{"ok": false, "rejected": true, "error": "provisioner delete answered 400"}', 60, 30, 3600, true)#>>'{instance,last_error}',
          'rejected: provisioner delete answered 400', 'rejection recorded');
SELECT is((SELECT count(*)::int FROM public.lifecycle_owed(100) WHERE subscription_id = '23000000-0000-4000-8000-000000000003'),
          0, 'a rejected failure is left to an operator');

-- the webhook cancels while a create is in flight: the outcome is recorded, the
-- newer status stays, and the same lease goes on to destroy.
INSERT INTO r VALUES ('c1', public.lifecycle_provision('24000000-0000-4000-8000-000000000004', 'w1', 60, true));
RESET role;
UPDATE public.instances SET desired_status = 'deprovisioned', status = 'deprovisioning'
 WHERE subscription_id = '24000000-0000-4000-8000-000000000004';
SET LOCAL role service_role;
INSERT INTO r VALUES ('c2', public.lifecycle_finish((SELECT (v#>>'{step,instance_id}')::uuid FROM r WHERE k = 'c1'),
          (SELECT v#>>'{step,token}' FROM r WHERE k = 'c1'),
          jsonb_build_object('ok', true, 'frontend_url', 'https://late'), 60, 30, 3600, true));
SELECT is((SELECT v#>>'{step,action}' FROM r WHERE k = 'c2'), 'destroy', 'cancelled mid-create: destroy next');
SELECT is((SELECT v#>>'{instance,status}' FROM r WHERE k = 'c2'), 'deprovisioning', 'status stays deprovisioning');
SELECT is(public.lifecycle_finish((SELECT (v#>>'{step,instance_id}')::uuid FROM r WHERE k = 'c1'),
          (SELECT v#>>'{step,token}' FROM r WHERE k = 'c1'), '{"ok": true}', 60, 30, 3600, true)#>>'{instance,status}',
          'deprovisioned', 'then deprovisioned');

SELECT * FROM finish();
ROLLBACK;
