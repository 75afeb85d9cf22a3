-- 40_owed_work.sql: the owed-work model of 040_owed_work.sql: the one derivation,
-- the stored owed columns and their due times, the claim, the lease, the edges,
-- the periodic job leases, least privilege.
BEGIN;
SELECT plan(86);

-- Fixtures: the seed's account; one subscription per scenario.
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('40000000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active'),
  ('42000000-0000-4000-8000-000000000002', '5eed5eed-0000-4000-8000-000000000001', 'price_free', 'free', 'unpaid'),
  ('43000000-0000-4000-8000-000000000003', '5eed5eed-0000-4000-8000-000000000001', 'price_professional', 'professional', 'cancelled'),
  ('44000000-0000-4000-8000-000000000004', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active'),
  ('45000000-0000-4000-8000-000000000005', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');

CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO service_role;
CREATE FUNCTION pg_temp.inst(p_sub text) RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances WHERE subscription_id = p_sub::uuid AND status <> 'deprovisioned'
$$;
CREATE FUNCTION pg_temp.step(p_k text, p_field text) RETURNS text LANGUAGE sql AS $$
    SELECT v #>> ARRAY['step', p_field] FROM r WHERE k = p_k
$$;
CREATE FUNCTION pg_temp.finish(p_k text, p_result jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.lifecycle_finish(pg_temp.step(p_k, 'instance_id')::uuid, pg_temp.step(p_k, 'token'),
                                   p_result, 60, 30, 3600)
$$;
GRANT EXECUTE ON FUNCTION pg_temp.inst(text), pg_temp.step(text, text), pg_temp.finish(text, jsonb) TO service_role;

-- 1. The vocabulary and the one rule --------------------------------------------------
SELECT is((SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c
            WHERE c.conname = 'lifecycle_action_check'
              AND c.contypid = 'public.lifecycle_action'::regtype),
          $$CHECK ((VALUE = ANY (ARRAY['create'::text, 'start'::text, 'update'::text, 'stop'::text, 'destroy'::text, 'email'::text, 'destroy_storage'::text, 'restart'::text])))$$,
          'one vocabulary: create, start, update, stop, destroy, email, destroy_storage, restart');
SELECT throws_ok($$SELECT 'provision'::public.lifecycle_action$$, '23514', NULL, 'no other word is owed work');
SELECT results_eq($$SELECT public.instance_desired_for(s)::text FROM unnest(enum_range(NULL::public.subscription_status)) s
                   ORDER BY s$$,
                  $$VALUES ('running'), ('running'), ('deprovisioned'), ('running'), (NULL), ('stopped'),
                           ('stopped'), ('deprovisioned')$$,
                  'desired status per subscription status (enum order: trialing active cancelled past_due incomplete unpaid paused incomplete_expired)');
SELECT results_eq($$
    SELECT public.lifecycle_owed_action(jsonb_populate_record(NULL::public.instances, jsonb_build_object(
               'status', v.st, 'desired_status', v.ds, 'config_version', v.cv,
               'applied_config_version', v.acv, 'welcome_email_sent_at', v.mail,
               'storage_destroyed_at', v.gone)))::text
      FROM (VALUES
        (1, 'deprovisioned', 'deprovisioned', 1, NULL::bigint, NULL::timestamptz, now()),
        (2, 'running', 'deprovisioned', 1, 1, now(), NULL::timestamptz),
        (3, 'deprovisioning', 'running', 1, 1, now(), NULL),
        (4, 'running', 'stopped', 1, 1, now(), NULL),
        (5, 'provisioning', 'stopped', 1, NULL, NULL, NULL),
        (6, 'provisioning', 'running', 1, NULL, NULL, NULL),
        (7, 'failed', 'running', 1, 1, now(), NULL),
        (8, 'stopped', 'running', 1, 1, now(), NULL),
        (9, 'running', 'running', 2, 1, now(), NULL),
        (10, 'running', 'running', 1, 1, NULL, NULL),
        (11, 'running', 'running', 1, 1, now(), NULL),
        (12, 'deprovisioned', 'deprovisioned', 1, 1, now(), NULL)) AS v(n, st, ds, cv, acv, mail, gone)
     ORDER BY v.n$$,
    $$VALUES (NULL::text), ('destroy'), ('destroy'), ('stop'), ('stop'), ('create'), ('create'), ('start'),
             ('update'), ('email'), (NULL), ('destroy_storage')$$,
    'lifecycle_owed_action: the rule, case by case');

SET LOCAL role service_role;

-- 2. provision records intent; the trigger stores what is owed, due now ------------------
INSERT INTO r VALUES ('p1', public.lifecycle_provision('40000000-0000-4000-8000-000000000001'));
SELECT is((SELECT v->>'outcome' FROM r WHERE k = 'p1'), 'ok', 'provision: recorded');
SELECT results_eq($$SELECT v#>>'{instance,owed_action}', v#>>'{instance,status}', v#>>'{instance,dokku_app_name}',
                           (v#>>'{instance,busy}')::boolean FROM r WHERE k = 'p1'$$,
                  $$VALUES ('create', 'provisioning', 'mindroom-400000000000', false)$$,
                  'a new instance owes a create; nobody claimed it yet');
SELECT results_eq($$SELECT owed_action::text, owed_due_at <= now(), owed_since = now(), config_version, applied_config_version
                      FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')$$,
                  $$VALUES ('create', true, true, 1::bigint, NULL::bigint)$$,
                  'owed columns stored with the row: due now');
SELECT ok((SELECT NOT (v->'instance' ? 'environment_vars') AND NOT (v->'instance' ? 'claimed_by') FROM r WHERE k = 'p1'),
          'the instance JSON never carries environment_vars nor the lease token');
SELECT is(public.lifecycle_provision('40000000-0000-4000-8000-000000000001')#>>'{instance,id}',
          (SELECT v#>>'{instance,id}' FROM r WHERE k = 'p1'), 'a second request is the same instance');
SELECT is((SELECT count(*)::int FROM public.instances WHERE subscription_id = '40000000-0000-4000-8000-000000000001'),
          1, 'still one row');

-- 3. the claim: the oldest due row, a lease, the step ----------------------------------
INSERT INTO r VALUES ('c1', public.lifecycle_claim('w1', 60));
SELECT is((SELECT v->>'outcome' FROM r WHERE k = 'c1'), 'claimed', 'the worker claims it');
SELECT results_eq($$SELECT pg_temp.step('c1', 'action'), pg_temp.step('c1', 'app'),
                           (SELECT v#>>'{step,payload,memory_mb}' FROM r WHERE k = 'c1'),
                           (SELECT v#>>'{step,payload,cpu}' FROM r WHERE k = 'c1'),
                           (SELECT v#>>'{step,payload,env,MINDROOM_SUBDOMAIN}' FROM r WHERE k = 'c1'),
                           pg_temp.step('c1', 'config_version')$$,
                  $$VALUES ('create', 'mindroom-400000000000', '1024', '1.00', 'm400000000000', '1')$$,
                  'the step carries what the provisioner needs');
SELECT results_eq($$SELECT status::text, claim_action::text, claimed_by LIKE '%/w1', owed_due_at = claim_expires_at,
                           claim_expires_at = now() + interval '60 seconds'
                      FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')$$,
                  $$VALUES ('provisioning', 'create', true, true, true)$$,
                  'leased: owed again only when the lease runs out');
SELECT results_eq($$SELECT v->>'outcome', (v->>'next_due_in_ms')::bigint BETWEEN 55000 AND 60000
                      FROM (SELECT public.lifecycle_claim('w2', 60) v) x$$,
                  $$VALUES ('none', true)$$, 'nothing else due; the next is the lease end');

-- 4. a stale token records nothing --------------------------------------------------------
SELECT is(public.lifecycle_finish((SELECT id FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')), 'not-the-token',
          '{"ok": true, "frontend_url": "https://evil"}', 60, 30, 3600)->>'outcome', 'lost', 'wrong token: lost');
SELECT is((SELECT frontend_url FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')), NULL, 'wrong token wrote nothing');

-- 5. failure: failed, backoff, lease released, due at the backoff ------------------------
SELECT is(pg_temp.finish('c1', '{"ok": false, "error": "provisioner create answered 500"}')->>'outcome',
          'failed', 'failure recorded');
SELECT results_eq($$SELECT status::text, attempts, last_error, claimed_by IS NULL, owed_action::text,
                           next_attempt_at = now() + interval '30 seconds', owed_due_at = next_attempt_at
                      FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')$$,
                  $$VALUES ('failed', 1, 'provisioner create answered 500', true, 'create', true, true)$$,
                  'failed, attempt 1, backoff 30 s, still owed: due after the backoff');
SELECT is(public.lifecycle_claim('w1', 60)->>'outcome', 'none', 'not claimable during its backoff');

-- 6. an explicit request lifts the backoff ------------------------------------------------
SELECT is(public.lifecycle_provision('40000000-0000-4000-8000-000000000001')#>>'{instance,owed_action}',
          'create', 'provision of a failed instance: create owed');
SELECT ok((SELECT owed_due_at <= now() FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')),
          'an operator''s request makes it due now');
INSERT INTO r VALUES ('c2', public.lifecycle_claim('w1', 60));
SELECT is((SELECT v#>>'{instance,status}' FROM r WHERE k = 'c2'), 'provisioning', 'failed -> provisioning on the claim');
SELECT is(pg_temp.finish('c2', '{"ok": false, "error": "timeout"}')->>'outcome', 'failed', 'second failure');
SELECT results_eq($$SELECT attempts, next_attempt_at = now() + interval '60 seconds'
                      FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')$$,
                  $$VALUES (2, true)$$, 'attempt 2 backs off 60 s');
RESET role;
UPDATE public.instances SET next_attempt_at = now() - interval '1 second'
 WHERE subscription_id = '40000000-0000-4000-8000-000000000001';
SET LOCAL role service_role;
SELECT ok((SELECT owed_due_at <= now() FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')),
          'due once its backoff has passed');

-- 7. success: running with URLs, the welcome email chained (a lease of its own) ----------
INSERT INTO r VALUES ('c3', public.lifecycle_claim('w1', 60));
INSERT INTO r VALUES ('s3', pg_temp.finish('c3', jsonb_build_object('ok', true,
    'frontend_url', 'https://m400000000000.example', 'backend_url', 'https://api', 'matrix_server_url', 'https://matrix',
    'config_version', pg_temp.step('c3', 'config_version')::bigint)));
SELECT results_eq($$SELECT v->>'outcome', v#>>'{step,action}', v#>>'{step,welcome,to}',
                         v#>>'{step,token}' <> pg_temp.step('c3', 'token'), split_part(v#>>'{step,token}', '/', 2)
                    FROM r WHERE k = 's3'$$,
                  $$VALUES ('claimed', 'email', 'test@example.com', true, 'w1')$$,
                  'after create: the welcome email, to the account, under a new lease of the same worker');
SELECT results_eq($$SELECT status::text, attempts, last_error, next_attempt_at, frontend_url, provisioned_at IS NOT NULL,
                           applied_config_version = config_version
                      FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')$$,
                  $$VALUES ('running', 0, NULL::text, NULL::timestamptz, 'https://m400000000000.example', true, true)$$,
                  'running, URLs, retry state cleared, configuration applied');

-- 8. email failure: its own columns and backoff; retry_in_s when given ------------------
SELECT is(pg_temp.finish('s3', '{"ok": false, "error": "skipped: RESEND_API_KEY is not set", "retry_in_s": 3600}')->>'outcome',
          'failed', 'email not sent');
SELECT results_eq($$SELECT status::text, welcome_email_attempts, welcome_email_error, owed_action::text,
                           owed_due_at = now() + interval '1 hour', claimed_by
                      FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')$$,
                  $$VALUES ('running', 1, 'skipped: RESEND_API_KEY is not set', 'email', true, NULL::text)$$,
                  'still running; the email owed in an hour');
SELECT is((SELECT v->>'outcome' FROM (SELECT public.lifecycle_provision('40000000-0000-4000-8000-000000000001') v) x),
          'ok', 'provision of a running instance');
SELECT ok((SELECT owed_due_at <= now() FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')),
          'an operator''s request makes the owed email due now');
INSERT INTO r VALUES ('c4', public.lifecycle_claim('w1', 60));
SELECT is(pg_temp.step('c4', 'action'), 'email', 'the email is claimed');
SELECT is(pg_temp.finish('c4', '{"ok": true}')->>'outcome', 'done', 'email sent: done');
SELECT results_eq($$SELECT owed_action, owed_due_at, owed_since FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')$$,
                  $$VALUES (NULL::public.lifecycle_action, NULL::timestamptz, NULL::timestamptz)$$,
                  'nothing owed');

-- 9. a plan change makes an update owed (config_version), the worker applies it ----------
RESET role;
UPDATE public.subscriptions SET tier = 'professional', stripe_price_id = 'price_professional'
 WHERE id = '40000000-0000-4000-8000-000000000001';
SET LOCAL role service_role;
SELECT results_eq($$SELECT owed_action::text, config_version, applied_config_version, memory_limit_mb
                      FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')$$,
                  $$VALUES ('update', 2::bigint, 1::bigint, 2048)$$, 'new limits: version 2, update owed');
INSERT INTO r VALUES ('c5', public.lifecycle_claim('w1', 60));
SELECT results_eq($$SELECT pg_temp.step('c5', 'action'), (SELECT v#>>'{step,payload,memory_mb}' FROM r WHERE k = 'c5'),
                           (SELECT v#>>'{instance,status}' FROM r WHERE k = 'c5')$$,
                  $$VALUES ('update', '2048', 'running')$$, 'an update keeps the app running');
SELECT is(pg_temp.finish('c5', jsonb_build_object('ok', true, 'config_version', 2))->>'outcome', 'done', 'update applied');
RESET role;
UPDATE public.instances SET environment_vars = '{"K": "v"}'
 WHERE subscription_id = '40000000-0000-4000-8000-000000000001';
UPDATE public.instances SET health_status = 'healthy'
 WHERE subscription_id = '40000000-0000-4000-8000-000000000001';
SET LOCAL role service_role;
SELECT results_eq($$SELECT owed_action::text, config_version FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')$$,
                  $$VALUES ('update', 3::bigint)$$,
                  'a new environment is a new version; a health write is not');
INSERT INTO r VALUES ('c5b', public.lifecycle_claim('w1', 60));
SELECT is(pg_temp.finish('c5b', jsonb_build_object('ok', true, 'config_version', 3))->>'outcome', 'done', 'applied');

-- 10. stop, then resume the same app ----------------------------------------------------
INSERT INTO r VALUES ('d1', public.lifecycle_deprovision(NULL, '40000000-0000-4000-8000-000000000001', 'stop'));
SELECT results_eq($$SELECT v->>'mode', v#>>'{instance,owed_action}', v#>>'{instance,desired_status}' FROM r WHERE k = 'd1'$$,
                  $$VALUES ('stop', 'stop', 'stopped')$$, 'stop: recorded, owed');
INSERT INTO r VALUES ('c6', public.lifecycle_claim('w1', 60));
SELECT is(pg_temp.finish('c6', '{"ok": true}')#>>'{instance,status}', 'stopped', 'stopped');
SELECT is(public.lifecycle_deprovision(NULL, '40000000-0000-4000-8000-000000000001', 'stop')#>>'{instance,owed_action}',
          NULL, 'a second stop: nothing owed');
SELECT is(public.lifecycle_provision('40000000-0000-4000-8000-000000000001')#>>'{instance,owed_action}',
          'start', 'stopped + provision: start owed');
INSERT INTO r VALUES ('c7', public.lifecycle_claim('w1', 60));
SELECT results_eq($$SELECT pg_temp.step('c7', 'action'), pg_temp.step('c7', 'app')$$,
                  $$VALUES ('start', 'mindroom-400000000000')$$, 'start, the same app');

-- 11. a dead worker's lease expires and is taken over with a new token -------------------
RESET role;
UPDATE public.instances SET claim_expires_at = now() - interval '1 second'
 WHERE subscription_id = '40000000-0000-4000-8000-000000000001';
SET LOCAL role service_role;
SELECT results_eq($$SELECT owed_action::text, owed_due_at <= now() FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')$$,
                  $$VALUES ('create', true)$$, 'expired lease mid-start: due again (provisioning -> create)');
INSERT INTO r VALUES ('c8', public.lifecycle_claim('w2', 60));
SELECT is((SELECT v->>'outcome' FROM r WHERE k = 'c8'), 'claimed', 'the expired lease is taken over');
SELECT isnt(pg_temp.step('c8', 'token'), pg_temp.step('c7', 'token'), 'with a new token');
SELECT is(pg_temp.finish('c7', '{"ok": true}')->>'outcome', 'lost', 'the dead worker''s late answer is ignored');

-- 12. a stopping worker gives its lease back: due again at once --------------------------
SELECT is(public.lifecycle_release(pg_temp.step('c8', 'instance_id')::uuid, 'not-mine'), false,
          'only the holder releases');
SELECT is(public.lifecycle_release(pg_temp.step('c8', 'instance_id')::uuid, pg_temp.step('c8', 'token')), true,
          'the holder releases');
SELECT results_eq($$SELECT claimed_by, owed_action::text, owed_due_at <= now() FROM pg_temp.inst('40000000-0000-4000-8000-000000000001')$$,
                  $$VALUES (NULL::text, 'create', true)$$, 'released: due now for whoever claims next');
INSERT INTO r VALUES ('c9', public.lifecycle_claim('w3', 60));
SELECT is(pg_temp.finish('c9', jsonb_build_object('ok', true, 'config_version', 3))#>>'{instance,status}',
          'running', 'finished by another worker');

-- 13. not entitled, not found ------------------------------------------------------------
SELECT is(public.lifecycle_provision('42000000-0000-4000-8000-000000000002')->>'outcome', 'not_entitled', 'unpaid: not entitled');
SELECT is((SELECT count(*)::int FROM public.instances WHERE subscription_id = '42000000-0000-4000-8000-000000000002'),
          0, 'no row for a non-entitled subscription');
SELECT is(public.lifecycle_provision('40000000-0000-4000-8000-0000000000ff')->>'outcome', 'not_found', 'unknown subscription');
SELECT is(public.lifecycle_deprovision('40000000-0000-4000-8000-0000000000ff', NULL, NULL)->>'outcome', 'not_found',
          'unknown instance');
SELECT throws_ok($$SELECT public.lifecycle_deprovision(NULL, '40000000-0000-4000-8000-000000000001', 'nuke')$$,
                 '22023', NULL, 'an unknown mode is refused');

-- 14. cancelled: destroy by default; a rejection is held for an operator, who lifts it ---
RESET role;
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status)
SELECT '43000000-0000-4000-8000-000000000003', n.dokku_app_name, n.subdomain, 'running'
  FROM public.instance_names('43000000-0000-4000-8000-000000000003') n;
SET LOCAL role service_role;
SELECT results_eq($$SELECT v->>'mode', v#>>'{instance,owed_action}'
                      FROM (SELECT public.lifecycle_deprovision(NULL, '43000000-0000-4000-8000-000000000003', NULL) v) x$$,
                  $$VALUES ('destroy', 'destroy')$$, 'cancelled: destroy by default');
INSERT INTO r VALUES ('x1', public.lifecycle_claim('w1', 60));
SELECT is((SELECT v#>>'{instance,status}' FROM r WHERE k = 'x1'), 'deprovisioning', 'destroy claimed: deprovisioning');
SELECT is(pg_temp.finish('x1', '{"ok": false, "rejected": true, "error": "provisioner delete answered 400"}')#>>'{instance,last_error}',
          'rejected: provisioner delete answered 400', 'rejection recorded');
SELECT results_eq($$SELECT owed_action::text, owed_due_at FROM pg_temp.inst('43000000-0000-4000-8000-000000000003')$$,
                  $$VALUES ('destroy', NULL::timestamptz)$$, 'still owed, but held for an operator');
SELECT ok((public.lifecycle_deprovision(NULL, '43000000-0000-4000-8000-000000000003', 'destroy')
           #>> '{instance,owed_due_at}')::timestamptz <= now(), 'an operator''s request lifts the hold');
-- Never a downgrade: a stop or a start asked of an instance owed destruction changes nothing.
SELECT is(public.lifecycle_deprovision(NULL, '43000000-0000-4000-8000-000000000003', 'stop')#>>'{instance,desired_status}',
          'deprovisioned', 'a stop never downgrades a destroy');
SELECT is(public.lifecycle_provision('43000000-0000-4000-8000-000000000003')->>'outcome', 'not_entitled',
          'nor does a provision');
INSERT INTO r VALUES ('x2', public.lifecycle_claim('w1', 60));
SELECT is(pg_temp.step('x2', 'action'), 'destroy', 'the destroy is due again');
SELECT is(pg_temp.finish('x2', '{"ok": true}')#>>'{instance,status}', 'deprovisioned', 'and done');

-- 15. cancelled while a create is in flight: the outcome is recorded, the newer intent
--     stays, and the worker goes on to destroy.
INSERT INTO r VALUES ('k1', public.lifecycle_provision('44000000-0000-4000-8000-000000000004'));
INSERT INTO r VALUES ('k2', public.lifecycle_claim('w1', 60));
SELECT is(pg_temp.step('k2', 'app'), 'mindroom-440000000000', 'the create of the other subscription');
SELECT is((public.instance_request(pg_temp.step('k2', 'instance_id')::uuid, 'deprovisioned')).desired_status::text,
          'deprovisioned', 'the webhook records the cancellation');
INSERT INTO r VALUES ('k3', pg_temp.finish('k2', '{"ok": true, "frontend_url": "https://late", "config_version": 1}'));
SELECT results_eq($$SELECT v#>>'{step,action}', v#>>'{instance,status}' FROM r WHERE k = 'k3'$$,
                  $$VALUES ('destroy', 'deprovisioning')$$, 'cancelled mid-create: destroy chained');
SELECT is(pg_temp.finish('k3', '{"ok": true, "retention_s": 2592000, "purged": false}')#>>'{instance,status}',
          'deprovisioned', 'then deprovisioned');
SELECT results_eq($$SELECT owed_action::text, owed_due_at = now() + interval '30 days' FROM public.instances
                     WHERE subscription_id = '44000000-0000-4000-8000-000000000004'$$,
                  $$VALUES ('destroy_storage', true)$$,
                  'deprovisioned owes only its storage''s destruction, after the retention period');

-- 16. the concurrency limit is a row --------------------------------------------------------
INSERT INTO r VALUES ('l1', public.lifecycle_provision('45000000-0000-4000-8000-000000000005'));
RESET role;
UPDATE public.lifecycle_limits SET max_in_flight = 0 WHERE scope = 'global';
SET LOCAL role service_role;
SELECT results_eq($$SELECT v->>'outcome', (v->>'next_due_in_ms')::bigint FROM (SELECT public.lifecycle_claim('w1', 60) v) x$$,
                  $$VALUES ('full', 0::bigint)$$, 'limit reached: full, although work is due');
RESET role;
UPDATE public.lifecycle_limits SET max_in_flight = 8 WHERE scope = 'global';
SET LOCAL role service_role;
SELECT is(public.lifecycle_claim('w1', 60)->>'outcome', 'claimed', 'below the limit: claimed');
SELECT throws_ok($$SELECT public.lifecycle_claim(NULL, 60)$$, '22023', NULL, 'a claim needs an owner');

-- 17. periodic jobs: one run per interval, whoever asks -------------------------------------
SELECT ok(public.scheduled_job_take('job-a', 'host1/1', 60) = now(), 'the first taker runs it');
SELECT is(public.scheduled_job_take('job-a', 'host2/7', 60), NULL, 'another host within the interval does not');
SELECT lives_ok($$SELECT public.scheduled_job_done('job-a', 'host1/1', NULL)$$, 'its end is recorded');
RESET role;
UPDATE public.scheduled_jobs SET until = now() - interval '1 second' WHERE name = 'job-a';
SET LOCAL role service_role;
SELECT ok(public.scheduled_job_take('job-a', 'host2/7', 60) IS NOT NULL, 'after the interval, the next taker runs it');
SELECT results_eq($$SELECT owner, runs, last_finished_at IS NOT NULL FROM public.scheduled_jobs WHERE name = 'job-a'$$,
                  $$VALUES ('host2/7', 2::bigint, true)$$, 'two runs recorded');
RESET role;
-- host2/7's run is still going (its last finish is the previous run's).
UPDATE public.scheduled_jobs SET until = now() - interval '1 second',
       last_finished_at = last_started_at - interval '1 second' WHERE name = 'job-a';
SET LOCAL role service_role;
SELECT is(public.scheduled_job_take('job-a', 'host3/9', 60), NULL,
          'a run longer than its interval is not joined by a second one');
RESET role;

-- 18. least privilege ---------------------------------------------------------------------
SELECT ok(NOT has_function_privilege('authenticated', 'public.lifecycle_claim(text, integer)', 'EXECUTE'),
          'tenants cannot claim work');
SELECT ok(NOT has_function_privilege('authenticated', 'public.lifecycle_provision(uuid)', 'EXECUTE'),
          'tenants cannot provision');
SELECT ok(NOT has_function_privilege('anon', 'public.scheduled_job_take(text, text, integer)', 'EXECUTE'),
          'anon cannot take job leases');
SELECT ok(has_function_privilege('service_role', 'public.lifecycle_claim(text, integer)', 'EXECUTE'),
          'service_role can claim');
SELECT ok(NOT has_table_privilege('authenticated', 'public.scheduled_jobs', 'SELECT')
          AND NOT has_table_privilege('authenticated', 'public.lifecycle_limits', 'SELECT'),
          'tenants read neither job leases nor limits');
SELECT ok(has_column_privilege('authenticated', 'public.instances', 'owed_action', 'SELECT')
          AND NOT has_column_privilege('authenticated', 'public.instances', 'claimed_by', 'SELECT'),
          'tenants see what is owed, never the lease token');

SELECT * FROM finish();
ROLLBACK;
