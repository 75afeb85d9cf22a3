-- 120_usage_day_forward.sql: the daily counter never moves back a day. Two
-- transactions that disagree on CURRENT_DATE (one began just before midnight and
-- took the subscription lock after one that began just after; or sessions with
-- different TimeZone settings) must not let the plan's daily limit be exceeded.
-- CURRENT_DATE is simulated with SET LOCAL TimeZone: UTC+14 is "the new day",
-- UTC-12 "the old day" (always 1 or 2 days apart) (120_usage_day_forward.sql).
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(4);

UPDATE public.subscriptions s SET max_messages_per_day = 2, current_messages_today = 0,
       last_reset_at = NULL
  FROM public.instances i WHERE i.id = 'aaaaaaaa-0000-4000-8000-000000000003' AND s.id = i.subscription_id;

SET LOCAL TimeZone = 'Etc/GMT-14';   -- the new day
SELECT public.track_usage('aaaaaaaa-0000-4000-8000-000000000003', NULL, NULL);
SELECT public.track_usage('aaaaaaaa-0000-4000-8000-000000000003', NULL, NULL);
SELECT is((SELECT t.allowed FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003', NULL, NULL) t),
          false, 'the new day: a third message is refused, the plan''s limit');

SET LOCAL TimeZone = 'Etc/GMT+12';   -- a report whose transaction began the day before
SELECT is((SELECT t.allowed FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003', NULL, NULL) t),
          false, 'the straggler is refused (the limit is reached)');

SET LOCAL TimeZone = 'Etc/GMT-14';   -- the new day again
SELECT is((SELECT s.last_reset_at FROM public.subscriptions s JOIN public.instances i
            ON s.id = i.subscription_id WHERE i.id = 'aaaaaaaa-0000-4000-8000-000000000003'),
          CURRENT_DATE, 'last_reset_at still says the new day');
SELECT is((SELECT t.allowed FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003', NULL, NULL) t),
          false, 'a third message of the new day is still refused');

SELECT * FROM finish();
ROLLBACK;
