-- A handler decides on stock levels it read, then writes its change in one statement. The statement checks
-- that the levels it decided on still hold; if not, it raises serialization_failure, nothing is written,
-- and the handler decides again on fresh reads.
CREATE FUNCTION choreo_expect(holds BOOLEAN, what TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF holds IS NOT TRUE THEN
        RAISE EXCEPTION 'stale decision: %', what USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN TRUE;
END
$$;
