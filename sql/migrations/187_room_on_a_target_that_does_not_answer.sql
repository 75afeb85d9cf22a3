-- 187_room_on_a_target_that_does_not_answer.sql: an instance waiting for room is
-- placed on a target that does not answer when no other has room for it, as a new
-- one is.
--
-- The claim passes over the waiting instances larger than public.target_room_mb, the
-- free memory of the target the rule would choose for an instance reserving nothing.
-- Since targets that answer come first (170_target_answering.sql), that was the room
-- of an answering target even when one that does not answer had more: an instance
-- that waited for room stayed waiting (no_capacity) while a target had room for it,
-- and customers who signed up after it were placed there at once.
--
-- Now the candidates of the rule are in one place (public.target_candidates: the
-- enabled, undrained targets, only the pinned ones while any is pinned, with their
-- free memory and whether they answer), public.target_choose picks among them as
-- before, and public.target_room_mb is the most free memory any of them has.
--
-- Redefines public.target_choose (170_target_answering.sql, same order) and
-- public.target_room_mb (130_waiting_for_room.sql).

CREATE FUNCTION public.target_candidates()
RETURNS TABLE (id bigint, free_mb bigint, answering boolean)
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    WITH c AS (
        SELECT t.id, t.pinned, public.target_free_mb(t.id) AS free_mb,
               t.unanswered_since IS NULL AS answering
          FROM public.provisioner_targets t
         WHERE t.enabled AND NOT t.drained)
    SELECT c.id, c.free_mb, c.answering FROM c
     WHERE c.pinned OR NOT EXISTS (SELECT 1 FROM c p WHERE p.pinned);
$$;

CREATE OR REPLACE FUNCTION public.target_choose(p_reserve_mb integer)
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT c.id FROM public.target_candidates() c
     WHERE c.free_mb - p_reserve_mb >= 0
     ORDER BY c.answering DESC, c.free_mb - p_reserve_mb DESC, c.id
     LIMIT 1;
$$;

-- The most memory a new instance may reserve now: the most free memory of a target
-- the rule may choose (answering or not), or NULL when none may take one (none has
-- room for an instance reserving nothing).
CREATE OR REPLACE FUNCTION public.target_room_mb()
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = ''
SET enable_sort = on
SET enable_seqscan = on
SET enable_bitmapscan = on
AS $$
    SELECT max(c.free_mb) FILTER (WHERE c.free_mb >= 0) FROM public.target_candidates() c;
$$;

REVOKE ALL ON FUNCTION public.target_candidates() FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.target_candidates() TO service_role;
