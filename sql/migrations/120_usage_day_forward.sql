-- 120_usage_day_forward.sql: the daily message counter never moves back a day.
--
-- track_usage reset the counter when last_reset_at was before CURRENT_DATE and then
-- wrote last_reset_at = CURRENT_DATE, allowed or refused. CURRENT_DATE is the day
-- the transaction began in its session's zone, and the subscription lock comes
-- later: a report that began at 23:59:59.99 and took the lock after one of the new
-- day wrote yesterday back, and the next report of the new day reset the count to
-- zero, forgetting the day's messages (so did two sessions whose TimeZone differ,
-- all day long): the plan's daily limit could be exceeded. A day the counter moved
-- to is now kept: an older CURRENT_DATE counts against it.
--
-- Redefines public.track_usage (003_functions.sql): unchanged but for those lines.

CREATE OR REPLACE FUNCTION public.track_usage(
    p_instance_id uuid,
    p_agent_name  text DEFAULT NULL,
    p_tool_name   text DEFAULT NULL
) RETURNS TABLE (allowed boolean, remaining integer)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_sub   uuid;
    v_count integer;
    v_max   integer;
    v_reset date;
BEGIN
    SELECT i.subscription_id INTO v_sub FROM public.instances i WHERE i.id = p_instance_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown instance %', p_instance_id USING ERRCODE = 'P0002';
    END IF;

    SELECT s.current_messages_today, s.max_messages_per_day, s.last_reset_at
      INTO v_count, v_max, v_reset
      FROM public.subscriptions s WHERE s.id = v_sub
      FOR UPDATE;
    -- A day the counter already moved to is never taken back: a call whose
    -- CURRENT_DATE is older (its transaction began before midnight, or its session
    -- is in a zone behind) counts against that later day.
    IF v_reset IS NULL OR v_reset < CURRENT_DATE THEN
        v_count := 0;
    END IF;
    v_reset := greatest(v_reset, CURRENT_DATE);
    v_count := coalesce(v_count, 0);

    IF v_max IS NOT NULL AND v_count >= v_max THEN
        UPDATE public.subscriptions
           SET current_messages_today = v_count, last_reset_at = v_reset
         WHERE id = v_sub AND (current_messages_today IS DISTINCT FROM v_count
                               OR last_reset_at IS DISTINCT FROM v_reset);
        allowed := false; remaining := 0;
        RETURN NEXT;
        RETURN;
    END IF;

    v_count := v_count + 1;
    UPDATE public.subscriptions
       SET current_messages_today = v_count, last_reset_at = v_reset
     WHERE id = v_sub;

    INSERT INTO public.usage_metrics AS u (instance_id, date, messages_sent, agents_used, tools_used)
    VALUES (p_instance_id, CURRENT_DATE, 1,
            CASE WHEN p_agent_name IS NOT NULL
                 THEN jsonb_build_object(p_agent_name, 1) ELSE '{}'::jsonb END,
            CASE WHEN p_tool_name IS NOT NULL
                 THEN jsonb_build_object(p_tool_name, 1) ELSE '{}'::jsonb END)
    ON CONFLICT (instance_id, date) DO UPDATE
    SET messages_sent = coalesce(u.messages_sent, 0) + 1,
        agents_used = CASE WHEN p_agent_name IS NOT NULL
                           THEN coalesce(u.agents_used, '{}'::jsonb) || jsonb_build_object(p_agent_name,
                                coalesce((u.agents_used ->> p_agent_name)::int, 0) + 1)
                           ELSE u.agents_used END,
        tools_used = CASE WHEN p_tool_name IS NOT NULL
                          THEN coalesce(u.tools_used, '{}'::jsonb) || jsonb_build_object(p_tool_name,
                               coalesce((u.tools_used ->> p_tool_name)::int, 0) + 1)
                          ELSE u.tools_used END;

    allowed := true;
    remaining := CASE WHEN v_max IS NULL THEN NULL ELSE v_max - v_count END;
    RETURN NEXT;
END;
$$;
