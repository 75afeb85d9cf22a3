-- 114_event_status_index.sql: stripe_events' status index holds only the events that
-- need attention: received (not finished), deferred, failed, refused.
--
-- Every query by status asks for those (ops_metrics' counts, mindroomctl
-- failed-events and refused-events; the retry sweep has its own index,
-- stripe_events_deferred_idx). Indexing every event put each delivery's row into
-- it, on the page of (processed, now()) that every concurrent delivery writes,
-- and the index grew with the table, which is never pruned. A settled event is
-- never looked up by its status; it is no longer in this index.
--
-- The index is rebuilt in this migration's transaction: writes to stripe_events
-- wait for one read of the table (a delivery waits, it is not refused).
DROP INDEX public.stripe_events_status_idx;
CREATE INDEX stripe_events_status_idx ON public.stripe_events (status, received_at)
    WHERE status IN ('received', 'deferred', 'failed', 'refused');
