-- 70_tenant.sql: 070_tenant.sql: instance credentials no tenant can read, usage
-- reports checked against a live credential and the plan's agents, the tenant API
-- under RLS with its restart limit, restarts as owed work, audit rows that say who
-- and from where.
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(79);

CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO anon, authenticated, service_role;
-- A = user aaaaaaaa (instance ...0003, starter), B = user bbbbbbbb.
CREATE FUNCTION pg_temp.v(p_k text) RETURNS jsonb LANGUAGE sql AS $$ SELECT v FROM r WHERE k = p_k $$;
CREATE FUNCTION pg_temp.inst(p_id text) RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances WHERE id = p_id::uuid $$;
-- Both instances configured, their welcome sent: nothing owed to begin with.
UPDATE public.instances SET applied_config_version = config_version, welcome_email_sent_at = now();

-- 1. Nobody but service_role reads or writes credentials ---------------------------------
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001', 'SELECT * FROM public.instance_tokens'),
          'err:42501', 'a tenant cannot read instance_tokens (key ids, hashes)');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
                       $$SELECT token_hash FROM public.instance_tokens WHERE instance_id = 'aaaaaaaa-0000-4000-8000-000000000003'$$),
          'err:42501', 'not even its own instance''s hash');
SELECT is(pg_temp.cell('anon', 'SELECT * FROM public.instance_tokens'), 'err:42501', 'anon neither');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
                       $$SELECT * FROM public.instance_secrets WHERE kind = 'control_plane'$$),
          'err:42501', 'a tenant cannot read the sealed token');
SELECT ok(NOT has_any_column_privilege('authenticated', 'public.instance_tokens', 'SELECT,INSERT,UPDATE')
          AND NOT has_any_column_privilege('anon', 'public.instance_tokens', 'SELECT,INSERT,UPDATE'),
          'no column of instance_tokens for tenants or anon');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
                       $$SELECT public.instance_token_issue('aaaaaaaa-0000-4000-8000-000000000003',
                         '0123456789abcdef', repeat('a', 64), 'mrs1:0:x', 'mrd1:0:x')$$),
          'err:42501', 'a tenant cannot issue a token');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
                       $$SELECT public.instance_track_usage('aaaaaaaa-0000-4000-8000-000000000003', 'x', NULL, NULL)$$),
          'err:42501', 'nor report usage itself');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
                       $$SELECT public.instance_token_rotate('aaaaaaaa-0000-4000-8000-000000000003')$$),
          'err:42501', 'nor rotate');
SELECT is(pg_temp.cell('anon', $$SELECT public.tenant_instance(NULL)$$), 'err:42501',
          'anon cannot call the tenant API');
SELECT is(pg_temp.cell('anon', $$SELECT public.tenant_instance_restart(NULL)$$), 'err:42501',
          'nor restart');
SELECT ok(NOT has_column_privilege('authenticated', 'public.instances', 'claimed_by', 'SELECT'),
          'the lease token stays private');

-- 2. Issuing: hash and sealed token together; the first token of a race stays ----------
SELECT is(pg_temp.run('service_role', $$INSERT INTO r VALUES ('i1', to_jsonb(public.instance_token_issue(
              'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1', repeat('1', 64),
              'mrs1:00000000:first', 'mrd1:00000000:f')))$$), 'ok:1', 'service_role issues a token');
SELECT is(pg_temp.run('service_role', $$INSERT INTO r VALUES ('i2', to_jsonb(public.instance_token_issue(
              'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a2', repeat('2', 64),
              'mrs1:00000000:second', 'mrd1:00000000:s')))$$), 'ok:1', 'a racing worker''s issue');
SELECT is(pg_temp.v('i2') #>> '{}', 'mrs1:00000000:first', 'hands back the token in force');
SELECT results_eq($$SELECT key_id, token_hash FROM public.instance_tokens
                     WHERE instance_id = 'aaaaaaaa-0000-4000-8000-000000000003'$$,
                  $$VALUES ('00000000000000a1', repeat('1', 64))$$, 'one credential: the first');
SELECT throws_ok($$SELECT public.instance_token_issue('bbbbbbbb-0000-4000-8000-000000000003',
                     'UPPER00000000000', repeat('1', 64), 'mrs1:0:x', 'mrd1:0:x')$$, '23514', NULL,
                 'a key id is 16 lowercase hex digits');
SELECT throws_ok($$SELECT public.instance_token_issue('bbbbbbbb-0000-4000-8000-000000000003',
                     '00000000000000b1', 'not-a-hash', 'mrs1:0:x', 'mrd1:0:x')$$, '23514', NULL,
                 'a hash is 64 lowercase hex digits');
SELECT is((SELECT count(*)::int FROM public.instance_tokens
            WHERE instance_id = 'bbbbbbbb-0000-4000-8000-000000000003'), 0, 'a refused issue writes nothing');
SELECT is((SELECT count(*)::int FROM public.audit_logs WHERE action = 'instance.token_issued'
            AND details ->> 'instance_id' = 'aaaaaaaa-0000-4000-8000-000000000003'), 1, 'issuing is audited once');

-- 3. Usage reports: a live credential, the plan's agents ---------------------------------
SELECT is(pg_temp.run('service_role', $$INSERT INTO r VALUES ('u0', public.instance_track_usage(
              'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a2', 'general', NULL))$$),
          'ok:1', 'a report with another key id');
SELECT is(pg_temp.v('u0'), '{"outcome": "revoked"}'::jsonb, 'is no report: revoked');
SELECT is(pg_temp.run('service_role', $$INSERT INTO r VALUES ('u1', public.instance_track_usage(
              'bbbbbbbb-0000-4000-8000-000000000003', '00000000000000a1', 'general', NULL))$$),
          'ok:1', 'A''s key id for B''s instance');
SELECT is(pg_temp.v('u1') ->> 'outcome', 'revoked', 'is no report for B either');
SELECT is(pg_temp.run('service_role', $$INSERT INTO r SELECT 'u' || n, public.instance_track_usage(
              'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1', a, 'search')
              FROM (VALUES (2, 'general'), (3, 'research'), (4, 'writer'), (5, 'fourth'), (6, 'fifth'),
                           (7, 'general')) x (n, a)$$), 'ok:6', 'six reports');
SELECT results_eq($$SELECT k, (v ->> 'allowed')::boolean, (v ->> 'remaining')::int, v ->> 'limit',
                           (v ->> 'agents_today')::int FROM r WHERE k IN ('u2', 'u3', 'u4', 'u5', 'u6', 'u7')
                     ORDER BY k$$,
                  $$VALUES ('u2', true, 999, NULL, 1), ('u3', true, 998, NULL, 2), ('u4', true, 997, NULL, 3),
                           ('u5', false, 997, 'agents', 3), ('u6', false, 997, 'agents', 3),
                           ('u7', true, 996, NULL, 3)$$,
                  'three agents a day (starter); a fourth and fifth refused, a known one counted');
SELECT results_eq($$SELECT messages_sent, agents_used FROM public.usage_metrics
                     WHERE instance_id = 'aaaaaaaa-0000-4000-8000-000000000003' AND date = CURRENT_DATE$$,
                  $$VALUES (4, '{"general": 2, "research": 1, "writer": 1}'::jsonb)$$,
                  'refused reports counted nothing');
SELECT ok((pg_temp.v('u2') ->> 'resets_at')::timestamptz = (CURRENT_DATE + 1)::timestamptz
          AND (pg_temp.v('u2') ->> 'retry_after_s')::int BETWEEN 1 AND 86400 + 3600,
          'resets_at: the next day, retry_after_s until then');
SELECT results_eq($$SELECT actor_role, actor_instance_id::text, details ->> 'limit', details ->> 'agent'
                     FROM public.audit_logs WHERE action = 'usage.limit_reached'$$,
                  $$VALUES ('instance', 'aaaaaaaa-0000-4000-8000-000000000003', 'agents', 'fourth')$$,
                  'the day''s first refusal is audited, the instance as actor; the second is not');
UPDATE public.subscriptions SET current_messages_today = 1000, last_reset_at = CURRENT_DATE
 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
SELECT is(pg_temp.run('service_role', $$INSERT INTO r VALUES ('u8', public.instance_track_usage(
              'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1', 'general', NULL))$$), 'ok:1',
          'a report over the daily limit');
SELECT results_eq($$SELECT (v ->> 'allowed')::boolean, (v ->> 'remaining')::int, v ->> 'limit' FROM r WHERE k = 'u8'$$,
                  $$VALUES (false, 0, 'messages')$$, 'is refused with the message limit');

-- 4. Stopping revokes; rotating revokes and owes an update -------------------------------
SELECT is(pg_temp.run('service_role', $$UPDATE public.instances SET status = 'stopped', desired_status = 'stopped'
                                         WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'$$), 'ok:1',
          'A''s instance stops');
SELECT results_eq($$SELECT (SELECT count(*)::int FROM public.instance_tokens WHERE instance_id = i.id),
                           (SELECT count(*)::int FROM public.instance_secrets WHERE instance_id = i.id
                              AND kind = 'control_plane'),
                           i.config_version - i.applied_config_version
                      FROM public.instances i WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'$$,
                  $$VALUES (0, 0, 1::bigint)$$,
                  'its credential and sealed token are gone, its configuration changed (a start re-applies it)');
SELECT is((SELECT details ->> 'reason' FROM public.audit_logs WHERE action = 'instance.token_revoked'),
          'stopped', 'audited with the reason');
SELECT throws_ok($$SELECT public.instance_token_issue('aaaaaaaa-0000-4000-8000-000000000003',
                     '00000000000000a3', repeat('3', 64), 'mrs1:0:x', 'mrd1:0:x')$$, '55000', NULL,
                 'a stopped instance gets no token');
UPDATE public.instances SET desired_status = 'running' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003';
SELECT is((pg_temp.inst('aaaaaaaa-0000-4000-8000-000000000003')).owed_action::text, 'start',
          'paid again: a start is owed');
UPDATE public.instances SET claim_action = 'start', claimed_by = 't'
 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003';
SELECT results_eq($$SELECT s ->> 'apply', s ->> 'token_key_id', s -> 'payload' IS NOT NULL
                      FROM (SELECT public.lifecycle_step_json(i) s FROM public.instances i
                             WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003') x$$,
                  $$VALUES ('true', NULL, true)$$,
                  'the start applies the configuration (POST /apps), with no live token: the worker issues one');
UPDATE public.instances SET claim_action = NULL, claimed_by = NULL
 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003';

SELECT lives_ok($$SELECT public.instance_token_issue('bbbbbbbb-0000-4000-8000-000000000003',
                    '00000000000000b2', repeat('b', 64), 'mrs1:0:b', 'mrd1:0:b')$$, 'B gets a token');
SELECT is(pg_temp.run('service_role', $$INSERT INTO r VALUES ('rot', public.instance_token_rotate(
              'bbbbbbbb-0000-4000-8000-000000000003'))$$), 'ok:1', 'an operator rotates B''s');
SELECT results_eq($$SELECT v ->> 'revoked', v ->> 'owed_action' FROM r WHERE k = 'rot'$$,
                  $$VALUES ('true', 'update')$$, 'revoked, an update owed (the worker issues the new one)');
SELECT results_eq($$SELECT (SELECT count(*)::int FROM public.instance_tokens WHERE instance_id = i.id),
                           (SELECT a.details ->> 'revoked_key_id' FROM public.audit_logs a
                             WHERE a.action = 'instance.token_rotated')
                      FROM public.instances i WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003'$$,
                  $$VALUES (0, '00000000000000b2')$$, 'the credential is gone, the rotation audited');
SELECT is(public.instance_token_rotate('bbbbbbbb-0000-4000-8000-0000000000ff') ->> 'outcome', 'not_found',
          'an unknown instance: not_found');
UPDATE public.instances SET applied_config_version = config_version
 WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';

-- 5. The tenant's view, under RLS ---------------------------------------------------------
SELECT is(pg_temp.run('bbbbbbbb-0000-4000-8000-000000000001',
                      $$INSERT INTO r VALUES ('tb', public.tenant_instance(NULL))$$), 'ok:1', 'B reads its instance');
SELECT results_eq($$SELECT v #>> '{instance,id}', v #>> '{instance,status}', v #>> '{plan,tier}',
                           (v #>> '{plan,max_agents}')::int, (v #>> '{usage,today,remaining}')::int,
                           jsonb_array_length(v #> '{usage,last_30_days}'),
                           v #>> '{subscription,cancel_at_period_end}', v ? 'health'
                      FROM r WHERE k = 'tb'$$,
                  $$VALUES ('bbbbbbbb-0000-4000-8000-000000000003', 'running', 'starter', 3, 1000, 30,
                            'false', true)$$,
                  'status, plan and limits, today''s usage, 30 days, billing, health');
SELECT ok(NOT (pg_temp.v('tb')::text LIKE '%sk-secret%' OR pg_temp.v('tb')::text LIKE '%environment_vars%'),
          'no secret in it');
SELECT is(pg_temp.run('aaaaaaaa-0000-4000-8000-000000000001',
                      $$INSERT INTO r VALUES ('ta', public.tenant_instance('bbbbbbbb-0000-4000-8000-000000000003'))$$),
          'ok:1', 'A asks for B''s instance');
SELECT ok(pg_temp.v('ta') IS NULL, 'and gets nothing');
SELECT is(pg_temp.cell('service_role', $$SELECT public.tenant_instance(NULL)$$), 'err:42501',
          'service_role has no "my" instance');

-- 6. Restarts: owed work, idempotent, 3 per account in 10 minutes -----------------------
SELECT is(pg_temp.run('bbbbbbbb-0000-4000-8000-000000000001',
                      $$INSERT INTO r VALUES ('r1', public.tenant_instance_restart(NULL))$$), 'ok:1', 'B restarts');
SELECT results_eq($$SELECT pg_temp.v('r1') ->> 'outcome', i.owed_action::text, i.restart_version
                      FROM public.instances i WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003'$$,
                  $$VALUES ('ok', 'restart', 1::bigint)$$, 'a restart is owed');
SELECT is(pg_temp.run('bbbbbbbb-0000-4000-8000-000000000001',
                      $$INSERT INTO r VALUES ('r2', public.tenant_instance_restart(NULL))$$), 'ok:1', 'again at once');
SELECT results_eq($$SELECT pg_temp.v('r2') ->> 'outcome', i.restart_version
                      FROM public.instances i WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003'$$,
                  $$VALUES ('pending', 1::bigint)$$, 'is the same restart: nothing recorded');
-- The worker claims it and carries it out (a failure first: the app stays running).
UPDATE public.instances SET claimed_by = 'tok', claim_expires_at = now() + interval '1 minute',
       claim_action = 'restart' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
SELECT is(public.lifecycle_finish('bbbbbbbb-0000-4000-8000-000000000003', 'tok',
                                  '{"ok": false, "error": "provisioner down"}', 60, 1, 8) #>> '{instance,status}',
          'running', 'a failed restart leaves the app running (retried)');
UPDATE public.instances SET claimed_by = 'tok', claim_expires_at = now() + interval '1 minute',
       claim_action = 'restart', next_attempt_at = NULL WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
SELECT is(public.lifecycle_finish('bbbbbbbb-0000-4000-8000-000000000003', 'tok',
                                  '{"ok": true, "restart_version": 1}', 60, 1, 8) ->> 'outcome',
          'done', 'a restart done');
SELECT results_eq($$SELECT applied_restart_version, restarted_at IS NOT NULL, owed_action::text
                      FROM public.instances WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003'$$,
                  $$VALUES (1::bigint, true, NULL)$$, 'is recorded: nothing owed');
SELECT is(pg_temp.run('bbbbbbbb-0000-4000-8000-000000000001',
                      $$INSERT INTO r VALUES ('r3', public.tenant_instance_restart(NULL))$$), 'ok:1', 'a second');
SELECT is(pg_temp.run('bbbbbbbb-0000-4000-8000-000000000001',
                      $$INSERT INTO r VALUES ('r4', public.tenant_instance_restart(NULL))$$), 'ok:1',
          'and at once again');
SELECT results_eq($$SELECT k, v ->> 'outcome' FROM r WHERE k IN ('r3', 'r4') ORDER BY k$$,
                  $$VALUES ('r3', 'ok'), ('r4', 'pending')$$, 'recorded once');
UPDATE public.instances SET applied_restart_version = restart_version
 WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
SELECT is(pg_temp.run('bbbbbbbb-0000-4000-8000-000000000001',
                      $$INSERT INTO r VALUES ('r5', public.tenant_instance_restart(NULL))$$), 'ok:1', 'a third');
UPDATE public.instances SET applied_restart_version = restart_version
 WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
-- The audit rows are the limit's memory; make the three 8 minutes old.
UPDATE public.audit_logs SET created_at = now() - interval '8 minutes'
 WHERE action = 'instance.restart_requested' AND account_id = 'bbbbbbbb-0000-4000-8000-000000000001';
SELECT is(pg_temp.run('bbbbbbbb-0000-4000-8000-000000000001',
                      $$INSERT INTO r VALUES ('r6', public.tenant_instance_restart(NULL))$$), 'ok:1', 'a fourth');
SELECT results_eq($$SELECT v ->> 'outcome', (v ->> 'retry_after_s')::int BETWEEN 100 AND 121 FROM r WHERE k = 'r6'$$,
                  $$VALUES ('rate_limited', true)$$,
                  'is refused until the oldest of three leaves the 10-minute window');
SELECT is((SELECT restart_version FROM public.instances WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003'),
          3::bigint, 'and records nothing');
SELECT is(pg_temp.run('aaaaaaaa-0000-4000-8000-000000000001',
                      $$INSERT INTO r VALUES ('ra', public.tenant_instance_restart('bbbbbbbb-0000-4000-8000-000000000003'))$$),
          'ok:1', 'A asks to restart B''s instance');
SELECT is(pg_temp.v('ra') ->> 'outcome', 'not_found', 'and is told there is no such instance');

-- 7. Audit rows say who and from where -----------------------------------------------------
SELECT results_eq($$SELECT actor_role, actor_user_id::text, count(*)::int FROM public.audit_logs
                     WHERE action = 'instance.restart_requested' AND details ? 'instance_id'
                     GROUP BY 1, 2$$,
                  $$VALUES ('authenticated', 'bbbbbbbb-0000-4000-8000-000000000001', 3)$$,
                  'restart requests: the user who asked');
SELECT lives_ok($$SELECT set_config('mindroom.request',
                   '{"ip": "198.51.100.7", "user_agent": "curl/8.5", "request_id": "req-1"}', true),
                   set_config('request.jwt.claims', '{"role": "service_role"}', true)$$, 'a request''s context');
INSERT INTO public.audit_logs (account_id, action) VALUES (NULL, 'test.context');
SELECT results_eq($$SELECT actor_role, host(ip_address), user_agent, request_id FROM public.audit_logs
                     WHERE action = 'test.context'$$,
                  $$VALUES ('service_role', '198.51.100.7', 'curl/8.5', 'req-1')$$,
                  'any audit row written in it records it');
SELECT lives_ok($$SELECT set_config('mindroom.request', '', true), set_config('request.jwt.claims', '', true)$$,
                'no request');
INSERT INTO public.audit_logs (account_id, action) VALUES (NULL, 'test.nocontext');
SELECT results_eq($$SELECT actor_role, ip_address, user_agent FROM public.audit_logs WHERE action = 'test.nocontext'$$,
                  $$VALUES (NULL::text, NULL::inet, NULL::text)$$, 'without one, nothing is made up');

-- 8. A redeploy that asks for it rotates the token in the same transaction -----------------
SELECT is(pg_temp.cell('bbbbbbbb-0000-4000-8000-000000000001', $$SELECT public.lifecycle_provision_rotating('bbbbbbbb-0000-4000-8000-000000000002')$$),
          'err:42501', 'a tenant cannot ask for a redeploy with a new token');
SELECT is(pg_temp.run('service_role', $$INSERT INTO r VALUES ('p0', to_jsonb(public.instance_token_issue(
              'bbbbbbbb-0000-4000-8000-000000000003', '00000000000000b8', repeat('8', 64), 'mrs1:00000000:b8', 'mrd1:00000000:b8')))$$),
          'ok:1', 'B''s running instance has a credential');
SELECT is(pg_temp.run('service_role', $$INSERT INTO r VALUES ('p1', public.lifecycle_provision_rotating('bbbbbbbb-0000-4000-8000-000000000002'))$$),
          'ok:1', 'service_role asks for B''s instance with a new token');
SELECT results_eq($$SELECT v ->> 'outcome', (v ->> 'token_rotated')::boolean, v #>> '{instance,owed_action}'
                     FROM r WHERE k = 'p1'$$,
                  $$VALUES ('ok', true, 'update')$$, 'recorded; the token rotated; an update owed delivers the new one');
SELECT is((SELECT count(*)::int FROM public.instance_tokens WHERE instance_id = 'bbbbbbbb-0000-4000-8000-000000000003'), 0,
          'the old credential is gone with that commit');
SELECT is(pg_temp.run('service_role', $$INSERT INTO r VALUES ('p2', public.lifecycle_provision_rotating(
              'aaaaaaaa-0000-4000-8000-000000000006'))$$), 'ok:1',
          'a subscription whose instance names are taken (its id shares the first 12 digits)');
SELECT results_eq($$SELECT v ->> 'outcome', v ? 'token_rotated' FROM r WHERE k = 'p2'$$,
                  $$VALUES ('conflict', false)$$, 'is refused, and nothing is rotated');
SELECT is(pg_temp.run('service_role', $$SELECT public.instance_token_issue(
              'bbbbbbbb-0000-4000-8000-000000000003', '00000000000000b9', repeat('9', 64), 'mrs1:00000000:b9', 'mrd1:00000000:b9')$$),
          'ok:1', 'B''s instance has a credential again');
UPDATE public.subscriptions SET status = 'incomplete' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002';
SELECT is(pg_temp.run('service_role', $$INSERT INTO r VALUES ('p3', public.lifecycle_provision_rotating('bbbbbbbb-0000-4000-8000-000000000002'))$$),
          'ok:1', 'a subscription that is not entitled');
SELECT results_eq($$SELECT v ->> 'outcome', v ? 'token_rotated' FROM r WHERE k = 'p3'$$,
                  $$VALUES ('not_entitled', false)$$, 'is refused');
SELECT is((SELECT key_id FROM public.instance_tokens WHERE instance_id = 'bbbbbbbb-0000-4000-8000-000000000003'), '00000000000000b9',
          'and its credential is left alone');

SELECT * FROM finish();
ROLLBACK;
