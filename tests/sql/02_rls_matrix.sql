-- The RLS matrix: every table x {anon, user A, user B, service_role} x {select,
-- update, delete of A's row and of B's row, insert}, each cell run as a real request
-- runs (set_config('role') + set_config('request.jwt.claims')) in a rolled-back
-- subtransaction. A cell is the number of rows the statement saw or changed, or E for
-- "permission denied" (SQLSTATE 42501).
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(7 * 4 * 7 + 4);

CREATE TEMP TABLE t_def (tbl text PRIMARY KEY, key text, a_key text, b_key text, upd text, ins text);
INSERT INTO t_def VALUES
 ('accounts', 'id', 'aaaaaaaa-0000-4000-8000-000000000001', 'bbbbbbbb-0000-4000-8000-000000000001',
  $$full_name = 'x'$$,
  $$INSERT INTO public.accounts (id, email) VALUES ('cccccccc-0000-4000-8000-000000000001', 'c@example.com')$$),
 ('plans', 'stripe_price_id', 'price_free', 'price_starter',
  $$name = 'x'$$,
  $$INSERT INTO public.plans (stripe_price_id, tier, name, max_agents, max_storage_gb, memory_limit_mb, cpu_limit)
    VALUES ('price_x', 'free', 'X', 1, 1, 256, 0.25)$$),
 ('subscriptions', 'id', 'aaaaaaaa-0000-4000-8000-000000000002', 'bbbbbbbb-0000-4000-8000-000000000002',
  $$cancel_at_period_end = true$$,
  $$INSERT INTO public.subscriptions (account_id, tier) VALUES ('aaaaaaaa-0000-4000-8000-000000000001', 'free')$$),
 ('instances', 'id', 'aaaaaaaa-0000-4000-8000-000000000003', 'bbbbbbbb-0000-4000-8000-000000000003',
  $$health_status = 'healthy'$$,
  $$INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain)
    VALUES ('aaaaaaaa-0000-4000-8000-000000000006', 'mindroom-zz', 'mzz')$$),
 ('usage_metrics', 'id', 'aaaaaaaa-0000-4000-8000-000000000004', 'bbbbbbbb-0000-4000-8000-000000000004',
  $$messages_sent = 6$$,
  $$INSERT INTO public.usage_metrics (instance_id, date)
    VALUES ('aaaaaaaa-0000-4000-8000-000000000003', CURRENT_DATE - 10)$$),
 ('audit_logs', 'id', 'aaaaaaaa-0000-4000-8000-000000000005', 'bbbbbbbb-0000-4000-8000-000000000005',
  $$action = 'x'$$,
  $$INSERT INTO public.audit_logs (account_id, action) VALUES ('aaaaaaaa-0000-4000-8000-000000000001', 'test')$$),
 ('stripe_events', 'id', 'evt_aaaaaaaa', 'evt_bbbbbbbb',
  $$status = 'processed'$$,
  $$INSERT INTO public.stripe_events (id, type, created, payload) VALUES ('evt_new', 'x', now(), '{}')$$);

-- Expected cells, in order: select A's row, select B's row, update A's, update B's,
-- delete A's, delete B's, insert.
CREATE TEMP TABLE t_expect (tbl text, who text, cells text);
INSERT INTO t_expect VALUES
 ('accounts',      'anon',    'E E E E E E E'),
 ('accounts',      'A',       '1 0 1 0 E E E'),
 ('accounts',      'B',       '0 1 0 1 E E E'),
 ('accounts',      'service', '1 1 1 1 1 1 1'),
 ('plans',         'anon',    'E E E E E E E'),
 ('plans',         'A',       '1 1 E E E E E'),
 ('plans',         'B',       '1 1 E E E E E'),
 ('plans',         'service', '1 1 E E E E E'),
 ('subscriptions', 'anon',    'E E E E E E E'),
 ('subscriptions', 'A',       '1 0 E E E E E'),
 ('subscriptions', 'B',       '0 1 E E E E E'),
 ('subscriptions', 'service', '1 1 1 1 1 1 1'),
 ('instances',     'anon',    'E E E E E E E'),
 ('instances',     'A',       '1 0 E E E E E'),
 ('instances',     'B',       '0 1 E E E E E'),
 ('instances',     'service', '1 1 1 1 1 1 1'),
 ('usage_metrics', 'anon',    'E E E E E E E'),
 ('usage_metrics', 'A',       '1 0 E E E E E'),
 ('usage_metrics', 'B',       '0 1 E E E E E'),
 ('usage_metrics', 'service', '1 1 1 1 1 1 1'),
 ('audit_logs',    'anon',    'E E E E E E E'),
 ('audit_logs',    'A',       '1 0 E E E E E'),
 ('audit_logs',    'B',       '0 1 E E E E E'),
 ('audit_logs',    'service', '1 1 E E E E 1'),
 ('stripe_events', 'anon',    'E E E E E E E'),
 ('stripe_events', 'A',       'E E E E E E E'),
 ('stripe_events', 'B',       'E E E E E E E'),
 ('stripe_events', 'service', '1 1 1 1 E E 1');

CREATE TEMP VIEW t_cells AS
SELECT e.tbl, e.who, op.n, op.label,
       CASE split_part(e.cells, ' ', op.n) WHEN 'E' THEN 'err:42501'
            ELSE 'ok:' || split_part(e.cells, ' ', op.n) END AS expected,
       CASE op.kind
            WHEN 'select' THEN format('SELECT %I FROM public.%I WHERE %I = %L', d.key, d.tbl, d.key, op.target)
            WHEN 'update' THEN format('UPDATE public.%I SET %s WHERE %I = %L', d.tbl, d.upd, d.key, op.target)
            WHEN 'delete' THEN format('DELETE FROM public.%I WHERE %I = %L', d.tbl, d.key, op.target)
            ELSE d.ins END AS stmt,
       CASE e.who WHEN 'A' THEN 'aaaaaaaa-0000-4000-8000-000000000001'
                  WHEN 'B' THEN 'bbbbbbbb-0000-4000-8000-000000000001'
                  WHEN 'service' THEN 'service_role' ELSE 'anon' END AS as_who
  FROM t_expect e JOIN t_def d USING (tbl)
  CROSS JOIN LATERAL (VALUES
      (1, 'select', 'select A''s row', d.a_key), (2, 'select', 'select B''s row', d.b_key),
      (3, 'update', 'update A''s row', d.a_key), (4, 'update', 'update B''s row', d.b_key),
      (5, 'delete', 'delete A''s row', d.a_key), (6, 'delete', 'delete B''s row', d.b_key),
      (7, 'insert', 'insert', NULL)) AS op (n, kind, label, target);

SELECT is((SELECT count(*) FROM t_cells), 7 * 4 * 7::bigint, 'the matrix covers 7 tables x 4 callers x 7 operations');

SELECT is(pg_temp.cell(as_who, stmt), expected, format('%s: %s %s', tbl, who, label))
  FROM t_cells ORDER BY tbl, who, n;

-- The fixture really has rows for both users (so a 0 above means "hidden", not "absent").
SELECT is(pg_temp.cell('service_role', 'SELECT 1 FROM public.instances WHERE id IN
          (''aaaaaaaa-0000-4000-8000-000000000003'', ''bbbbbbbb-0000-4000-8000-000000000003'')'),
          'ok:2', 'both instances exist');
-- Full scans show a user their own rows only.
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
          'SELECT 1 FROM public.subscriptions WHERE account_id <> ''aaaaaaaa-0000-4000-8000-000000000001'''),
          'ok:0', 'A''s full scan of subscriptions shows no one else''s');
-- The role decides, not the claims: anon with A's sub still reads nothing.
SELECT is(pg_temp.cell('anon', $$SELECT set_config('request.jwt.claims',
          '{"sub":"aaaaaaaa-0000-4000-8000-000000000001","role":"anon"}', true);
          SELECT 1 FROM public.accounts$$), 'err:42501', 'anon with a user''s sub still reads nothing');

SELECT * FROM finish();
ROLLBACK;
