-- Names match whatever the spelling variants of their Arabic letters, as they already matched
-- whatever their case and Latin accents: Patient search in the FHIR API (`patient_name_part`)
-- and C-FIND on PatientName and ReferringPhysicianName (`dicom_study.*_folded`). A name is
-- written أحمد at one hospital and احمد at another, فاطمة on a lab's order and فاطمه on a
-- modality's worklist, with or without its short vowels; a clinician searching for the patient
-- types one of them. `qantara_fold` now also folds, as Lucene's ArabicNormalizer does:
--   - alef with madda, hamza above or below, and alef wasla (آ أ إ ٱ) to bare alef (ا);
--   - alef maksura (ى) to yeh (ي), teh marbuta (ة) to heh (ه);
--   - the tatweel (ـ), the short vowels and other harakat (U+064B-U+0652), the maddah and the
--     hamza above and below as combining marks (U+0653-U+0655) and the superscript alef
--     (U+0670) are dropped.
-- Names are stored as received: only the folded forms used for matching change, and only those
-- of names holding one of these characters are written again here (as 0014 requires of a
-- migration that changes what `qantara_fold` returns). It took 15 s for 100,000 patients and
-- 200,000 studies, all of them with Arabic names (2 vCPUs, PostgreSQL 15): a gateway upgraded on
-- a national archive waits that long per such 100,000 at its first start (or `qantara migrate`).
CREATE OR REPLACE FUNCTION qantara_fold(value text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT lower(translate(value,
                           'ÀÁÂÃÄÅÇÈÉÊËÌÍÎÏÑÒÓÔÕÖÙÚÛÜÝàáâãäåçèéêëìíîïñòóôõöùúûüýÿĀāĂăĄąĆćĈĉĊċČčĎďĒēĔĕĖėĘęĚěĜĝĞğĠġĢģĤĥĨĩĪīĬĭĮįİĴĵĶķĹĺĻļĽľŃńŅņŇňŌōŎŏŐőŔŕŖŗŘřŚśŜŝŞşŠšŢţŤťŨũŪūŬŭŮůŰűŲųŴŵŶŷŸŹźŻżŽžƠơƯưǍǎǏǐǑǒǓǔǕǖǗǘǙǚǛǜǞǟǠǡǦǧǨǩǪǫǬǭǰǴǵǸǹǺǻȀȁȂȃȄȅȆȇȈȉȊȋȌȍȎȏȐȑȒȓȔȕȖȗȘșȚțȞȟȦȧȨȩȪȫȬȭȮȯȰȱȲȳآأإٱىةـًٌٍَُِّْٰٕٓٔ',
                           'aaaaaaceeeeiiiinooooouuuuyaaaaaaceeeeiiiinooooouuuuyyaaaaaaccccccccddeeeeeeeeeegggggggghhiiiiiiiiijjkkllllllnnnnnnoooooorrrrrrssssssssttttuuuuuuuuuuuuwwyyyzzzzzzoouuaaiioouuuuuuuuuuaaaaggkkoooojggnnaaaaaaeeeeiiiioooorrrruuuusstthhaaeeooooooooyyاااايه'))
$$;

UPDATE dicom_study
SET patient_name = patient_name, referring_physician = referring_physician
WHERE patient_name ~ '[آأإٱىةـًٌٍَُِّْٰٕٓٔ]' OR referring_physician ~ '[آأإٱىةـًٌٍَُِّْٰٕٓٔ]';

CREATE TEMPORARY TABLE refolded ON COMMIT DROP AS
SELECT id FROM patient
WHERE concat(names::text, family, array_to_string(given, ' ')) ~ '[آأإٱىةـًٌٍَُِّْٰٕٓٔ]';

DELETE FROM patient_name_part WHERE patient_id IN (SELECT id FROM refolded);

INSERT INTO patient_name_part (patient_id, part)
SELECT p.id, part
FROM patient p JOIN refolded r ON r.id = p.id,
     unnest(qantara_name_parts(p.names, p.family, p.given)) AS part
ON CONFLICT DO NOTHING;
